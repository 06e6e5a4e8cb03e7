// SPDX-License-Identifier: GPL-2.0-only
//! Small safe wrappers over `struct block_device` and a block device opened
//! by the module.

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

    /// Drops the device's page cache (`invalidate_bdev()`). Process context.
    pub(crate) fn invalidate_cache(&self) {
        // SAFETY: The device is valid; called from process context.
        unsafe { bindings::invalidate_bdev(self.as_ptr()) };
    }

    /// Whether a block device filter is attached to the device.
    pub(crate) fn has_filter(&self) -> bool {
        // SAFETY: The device is valid; a racy look at the pointer is all a
        // refusal needs.
        unsafe { !core::ptr::read_volatile(&(*self.as_ptr()).bd_filter).is_null() }
    }

    /// The holder operations of whoever holds the device exclusively.
    pub(crate) fn holder_ops(&self) -> *const bindings::blk_holder_ops {
        // SAFETY: The device is valid; a snapshot is all a refusal needs.
        unsafe { core::ptr::read_volatile(&(*self.as_ptr()).bd_holder_ops) }
    }

    /// Whether the device (or its disk) is read-only.
    pub(crate) fn read_only(&self) -> bool {
        // SAFETY: The device is valid.
        unsafe { bindings::bdev_read_only(self.as_ptr()) }
    }

    /// Whether the device's disk is request-based (blk-mq): the attach
    /// drain (a queue freeze) waits for every write it has in flight, which
    /// it does not for a bio-based driver.
    pub(crate) fn is_request_based(&self) -> bool {
        // SAFETY: The device, its disk and the disk's queue are valid while
        // the device is (the disk holds its queue until it is released).
        unsafe { !(*(*(*self.as_ptr()).bd_disk).queue).mq_ops.is_null() }
    }

    /// Whether the device is zoned (zone append and reset write without
    /// going through the region accounting).
    pub(crate) fn is_zoned(&self) -> bool {
        // SAFETY: The device is valid.
        unsafe { bindings::bdev_is_zoned(self.as_ptr()) }
    }

    /// Whether its disk is going away (`GD_DEAD`): no I/O to it completes
    /// normally any more.
    pub(crate) fn disk_dead(&self) -> bool {
        // SAFETY: `bd_disk` is assigned once at creation and outlives the
        // device; `state` is a bit field the block layer changes with
        // atomic bit operations, so a plain atomic load reads it.
        let state = unsafe {
            let word = core::ptr::addr_of!((*(*self.as_ptr()).bd_disk).state);
            (*word.cast::<core::sync::atomic::AtomicUsize>())
                .load(core::sync::atomic::Ordering::Relaxed)
        };
        state & (1 << bindings::GD_DEAD) != 0
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
    /// Opens `dev` for reading and writing, exclusively for `holder`,
    /// which the block layer tells through `holder.ops()` when the device
    /// goes away.
    pub(crate) fn open_exclusive(dev: DevT, holder: Holder) -> Result<Self> {
        let mode = bindings::BLK_OPEN_READ | bindings::BLK_OPEN_WRITE | bindings::BLK_OPEN_EXCL;
        // SAFETY: `holder` is a unique cookie that outlives the open, and
        // its operations are static.
        let file = from_err_ptr(unsafe {
            bindings::bdev_file_open_by_dev(dev.0, mode, holder.as_ptr(), holder.ops())
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
