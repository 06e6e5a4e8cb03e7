// SPDX-License-Identifier: GPL-2.0-only
//! Small safe wrappers over `struct block_device`, `struct bio` and a block
//! device opened by the module.

use kernel::{bindings, error::from_err_ptr, prelude::*, types::Opaque};

use crate::filter::Holder;

/// Number of minor bits in a `dev_t` (`MINORBITS`).
const MINOR_BITS: u32 = 20;

/// A device number.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct DevT(bindings::dev_t);

impl DevT {
    /// The device number `major:minor` (`MKDEV`), if both fit.
    pub(crate) fn new(major: u32, minor: u32) -> Option<Self> {
        if major >= 1 << (32 - MINOR_BITS) || minor >= 1 << MINOR_BITS {
            return None;
        }
        Some(Self((major << MINOR_BITS) | minor))
    }

    /// Major number.
    pub(crate) fn major(self) -> u32 {
        self.0 >> MINOR_BITS
    }

    /// Minor number.
    pub(crate) fn minor(self) -> u32 {
        self.0 & ((1 << MINOR_BITS) - 1)
    }
}

/// A block device (whole disk or partition) the caller holds a reference
/// to for as long as it uses the `&BlockDevice`.
#[repr(transparent)]
pub(crate) struct BlockDevice(Opaque<bindings::block_device>);

impl BlockDevice {
    /// Wraps a raw pointer.
    ///
    /// # Safety
    ///
    /// `ptr` must point to a valid `struct block_device` that stays valid
    /// for `'a`.
    pub(crate) unsafe fn from_raw<'a>(ptr: *mut bindings::block_device) -> &'a Self {
        // SAFETY: `BlockDevice` is a transparent wrapper over the C struct;
        // validity for `'a` is guaranteed by the caller.
        unsafe { &*ptr.cast::<Self>() }
    }

    /// The raw `struct block_device`.
    pub(crate) fn as_ptr(&self) -> *mut bindings::block_device {
        self.0.get()
    }

    /// How many times the device is open (`bd_openers`).
    pub(crate) fn openers(&self) -> i32 {
        // SAFETY: The device is valid; `bd_openers` is an `atomic_t`, read
        // once without a lock (a snapshot is all the caller needs).
        unsafe { core::ptr::read_volatile(&(*self.as_ptr()).bd_openers.counter) }
    }

    /// Device number.
    pub(crate) fn dev(&self) -> DevT {
        // SAFETY: `bd_dev` is assigned once at creation.
        DevT(unsafe { (*self.as_ptr()).bd_dev })
    }

    /// Size in 512-byte sectors.
    pub(crate) fn nr_sectors(&self) -> u64 {
        // SAFETY: The device is valid (type invariant of `&Self`).
        unsafe { bindings::bdev_nr_sectors(self.as_ptr()) }
    }

    /// First sector of the device on its whole disk (0 for a whole disk).
    pub(crate) fn start_sect(&self) -> u64 {
        // SAFETY: `bd_start_sect` of a live partition does not change (a
        // resize changes the size only).
        unsafe { (*self.as_ptr()).bd_start_sect }
    }

    /// Logical block size in bytes.
    pub(crate) fn logical_block_size(&self) -> u32 {
        // SAFETY: The device is valid.
        unsafe { bindings::bdev_logical_block_size(self.as_ptr()) }
    }

    /// The disk the device belongs to, as an identity to compare.
    pub(crate) fn disk_id(&self) -> usize {
        // SAFETY: `bd_disk` is assigned once at creation.
        unsafe { (*self.as_ptr()).bd_disk as usize }
    }

    /// Whether the sector ranges of `self` and `other` on their disk share
    /// a sector (both on the same disk).
    pub(crate) fn overlaps(&self, other: &BlockDevice) -> bool {
        if self.disk_id() != other.disk_id() {
            return false;
        }
        let (a, b) = (self.start_sect(), other.start_sect());
        a < b.saturating_add(other.nr_sectors()) && b < a.saturating_add(self.nr_sectors())
    }
}

/// Operation of a bio (`REQ_OP_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Op {
    /// `REQ_OP_READ`.
    Read,
    /// `REQ_OP_WRITE` (possibly an empty PREFLUSH).
    Write,
    /// `REQ_OP_DISCARD` or `REQ_OP_SECURE_ERASE`.
    Discard,
    /// `REQ_OP_WRITE_ZEROES`.
    WriteZeroes,
    /// Anything else (zone management, driver private).
    Other,
}

/// A bio handed to the filter. Only ever used by reference, for the time
/// the submission path lends it to the filter.
#[repr(transparent)]
pub(crate) struct Bio(Opaque<bindings::bio>);

impl Bio {
    /// Wraps a raw pointer.
    ///
    /// # Safety
    ///
    /// `ptr` must point to a valid `struct bio` that stays valid and is not
    /// accessed by anyone else for `'a`.
    pub(crate) unsafe fn from_raw<'a>(ptr: *mut bindings::bio) -> &'a Self {
        // SAFETY: Transparent wrapper; validity guaranteed by the caller.
        unsafe { &*ptr.cast::<Self>() }
    }

    /// The raw `struct bio`.
    pub(crate) fn as_ptr(&self) -> *mut bindings::bio {
        self.0.get()
    }

    /// Whether the submitter asked not to block (`REQ_NOWAIT`).
    pub(crate) fn is_nowait(&self) -> bool {
        self.opf() & bindings::REQ_NOWAIT != 0
    }

    fn opf(&self) -> u32 {
        // SAFETY: The bio is valid and owned by the submission path we run
        // in; nothing changes `bi_opf` concurrently.
        unsafe { (*self.0.get()).bi_opf }
    }

    /// The bio's operation.
    pub(crate) fn op(&self) -> Op {
        match self.opf() & bindings::REQ_OP_MASK {
            bindings::req_op_REQ_OP_READ => Op::Read,
            bindings::req_op_REQ_OP_WRITE => Op::Write,
            bindings::req_op_REQ_OP_DISCARD | bindings::req_op_REQ_OP_SECURE_ERASE => Op::Discard,
            bindings::req_op_REQ_OP_WRITE_ZEROES => Op::WriteZeroes,
            _ => Op::Other,
        }
    }

    /// First sector, relative to the whole disk (the partition offset has
    /// been added by the time a filter sees the bio).
    pub(crate) fn disk_sector(&self) -> u64 {
        // SAFETY: As in `opf`.
        unsafe { (*self.0.get()).bi_iter.bi_sector }
    }

    /// Length in 512-byte sectors (0 for an empty flush).
    pub(crate) fn nr_sectors(&self) -> u64 {
        // SAFETY: As in `opf`.
        u64::from(unsafe { (*self.0.get()).bi_iter.bi_size }) >> crate::region::SECTOR_SHIFT
    }

    /// First sector relative to the filtered device `bdev`.
    pub(crate) fn sector_in(&self, bdev: &BlockDevice) -> u64 {
        self.disk_sector().saturating_sub(bdev.start_sect())
    }
}

/// A block device the module opened, closed on drop.
///
/// # Invariants
///
/// `file` is a block device file returned by `bdev_file_open_by_dev()` that
/// this object owns.
pub(crate) struct OpenDevice {
    file: *mut bindings::file,
}

// SAFETY: The opened file can be used and closed from any thread.
unsafe impl Send for OpenDevice {}
// SAFETY: All methods take `&self` and only read immutable properties.
unsafe impl Sync for OpenDevice {}

impl OpenDevice {
    /// Opens `dev` for reading and writing, exclusively for `holder`.
    pub(crate) fn open_exclusive(dev: DevT, holder: Holder) -> Result<Self> {
        let mode = bindings::BLK_OPEN_READ | bindings::BLK_OPEN_WRITE | bindings::BLK_OPEN_EXCL;
        // SAFETY: `holder` is a unique cookie that outlives the open; no
        // holder operations are passed.
        let file = from_err_ptr(unsafe {
            bindings::bdev_file_open_by_dev(dev.0, mode, holder.as_ptr(), core::ptr::null())
        })?;
        // INVARIANT: `file` was just opened and is owned by the new object.
        Ok(Self { file })
    }

    /// The opened block device.
    pub(crate) fn bdev(&self) -> &BlockDevice {
        // SAFETY: `file` is a block device file (type invariant), so
        // `file_bdev()` is its device, valid until the file is closed.
        unsafe { BlockDevice::from_raw(bindings::file_bdev(self.file)) }
    }
}

impl Drop for OpenDevice {
    fn drop(&mut self) {
        // SAFETY: `file` is owned by `self` (type invariant) and closed once.
        unsafe { bindings::bdev_fput(self.file) };
    }
}
