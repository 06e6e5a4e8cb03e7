//! The blkmig filter's ioctls: attach, detach, control.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

use blkmig_core::abi::{
    self, AttachOptions, BlkfilterAttach, BlkfilterCtl, BlkfilterDetach, CtlCmd, HoldRequest,
    RegionOp, Status, SyncedQuery,
};
use rustix::ioctl::{self, opcode, Updater};

use crate::device::{DevId, Probe};
use crate::tracker::{Tracker, TrackerError};

const ATTACH: ioctl::Opcode =
    opcode::write::<BlkfilterAttach>(abi::BLK_IOCTL_TYPE, abi::BLKFILTER_ATTACH_NR);
const DETACH: ioctl::Opcode =
    opcode::write::<BlkfilterDetach>(abi::BLK_IOCTL_TYPE, abi::BLKFILTER_DETACH_NR);
const CTL: ioctl::Opcode =
    opcode::read_write::<BlkfilterCtl>(abi::BLK_IOCTL_TYPE, abi::BLKFILTER_CTL_NR);

// The opcodes rustix computes are the ones the ABI crate states.
const _: () = assert!(ATTACH as u64 == abi::BLKFILTER_ATTACH as u64);
const _: () = assert!(DETACH as u64 == abi::BLKFILTER_DETACH as u64);
const _: () = assert!(CTL as u64 == abi::BLKFILTER_CTL as u64);

/// A filter request the kernel refused.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {what}: {meaning} ({name})", path = .path.display(), name = errno_name(.errno))]
pub struct FilterError {
    /// The filtered (source) device.
    pub path: PathBuf,
    /// What was asked: "cannot attach blkmig", ...
    pub what: &'static str,
    /// What the errno means here.
    pub meaning: String,
    /// Positive errno.
    pub errno: i32,
}

/// The symbolic name of an errno, for messages an operator can search for.
pub fn errno_name(e: &i32) -> &'static str {
    match *e {
        libc::EPERM => "EPERM",
        libc::ENOENT => "ENOENT",
        libc::EIO => "EIO",
        libc::ENXIO => "ENXIO",
        libc::EBADF => "EBADF",
        libc::EAGAIN => "EAGAIN",
        libc::ENOMEM => "ENOMEM",
        libc::EACCES => "EACCES",
        libc::EFAULT => "EFAULT",
        libc::EBUSY => "EBUSY",
        libc::EEXIST => "EEXIST",
        libc::EXDEV => "EXDEV",
        libc::ENODEV => "ENODEV",
        libc::EINVAL => "EINVAL",
        libc::ENOTTY => "ENOTTY",
        libc::EFBIG => "EFBIG",
        libc::ENOSPC => "ENOSPC",
        libc::EROFS => "EROFS",
        libc::ERANGE => "ERANGE",
        libc::ENOSYS => "ENOSYS",
        libc::EOPNOTSUPP => "EOPNOTSUPP",
        libc::ETIMEDOUT => "ETIMEDOUT",
        libc::EALREADY => "EALREADY",
        libc::ECANCELED => "ECANCELED",
        libc::ENOPKG => "ENOPKG",
        libc::EMEDIUMTYPE => "EMEDIUMTYPE",
        libc::E2BIG => "E2BIG",
        _ => "errno",
    }
}

fn name() -> [u8; abi::BLKFILTER_NAME_LENGTH] {
    let mut n = [0u8; abi::BLKFILTER_NAME_LENGTH];
    n[..abi::FILTER_NAME.len()].copy_from_slice(abi::FILTER_NAME);
    n
}

/// A handle on a block device for filter ioctls (opened for reading and
/// writing, as the kernel requires, and not exclusively: the device is in
/// use).
pub struct Filtered {
    path: PathBuf,
    file: File,
}

impl Filtered {
    /// Opens `path` for filter requests.
    pub fn open(path: &Path) -> Result<Self, crate::error::Error> {
        // Filter requests need a file opened for writing (as BLKDISCARD).
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| crate::error::Error::io(crate::error::Op::Open, path, 0, e))?;
        Ok(Self {
            path: path.to_owned(),
            file,
        })
    }

    fn err(
        &self,
        what: &'static str,
        e: rustix::io::Errno,
        meaning: impl FnOnce(i32) -> Option<String>,
    ) -> FilterError {
        let errno = e.raw_os_error();
        let meaning = meaning(errno).unwrap_or_else(|| match errno {
            libc::ENOTTY => "this kernel has no block-device filter support (boot a kernel with the blkmig patch)".to_owned(),
            libc::EPERM => "permission denied: filter requests need CAP_SYS_ADMIN".to_owned(),
            libc::EBADF => "filter requests need the device opened for writing".to_owned(),
            libc::ENOENT => "no blkmig filter is attached to this device".to_owned(),
            libc::ENODEV => "the blkmig module is not loaded".to_owned(),
            _ => std::io::Error::from_raw_os_error(errno).to_string(),
        });
        FilterError {
            path: self.path.clone(),
            what,
            meaning,
            errno,
        }
    }

    /// Attaches blkmig, migrating to `target`.
    pub fn attach(&self, target: &Probe, opts: AttachOptions) -> Result<(), FilterError> {
        let DevId::Block { major, minor } = target.id else {
            return Err(FilterError {
                path: self.path.clone(),
                what: "cannot attach blkmig",
                meaning: format!("the target {} is not a block device", target.path.display()),
                errno: libc::ENOTBLK,
            });
        };
        let opts = AttachOptions {
            target_major: major,
            target_minor: minor,
            ..opts
        };
        let mut arg = BlkfilterAttach {
            name: name(),
            opt: std::ptr::from_ref(&opts) as u64,
            optlen: size_of::<AttachOptions>() as u32,
            reserved: 0,
        };
        // SAFETY: BLKFILTER_ATTACH reads one `BlkfilterAttach` (`arg`, alive
        // for the call) and `optlen` bytes at `opt`, which points at `opts`,
        // also alive for the call and exactly that long.
        unsafe {
            ioctl::ioctl(
                &self.file,
                Updater::<ATTACH, BlkfilterAttach>::new(&mut arg),
            )
        }
        .map_err(|e| {
            self.err("cannot attach blkmig", e, |errno| {
                Some(match errno {
                    libc::EBUSY => {
                        "the device already has a block-device filter attached".to_owned()
                    }
                    libc::EALREADY => "blkmig is already attached to this device".to_owned(),
                    libc::ENOSPC => format!(
                        "the target {} is smaller than the source",
                        target.path.display()
                    ),
                    libc::EXDEV => format!(
                        "the target {} is the source itself or overlaps it",
                        target.path.display()
                    ),
                    libc::EINVAL => {
                        "the kernel refused the options (region size, block size or version)"
                            .to_owned()
                    }
                    libc::E2BIG => {
                        "the source has too many regions: use a larger --region-size".to_owned()
                    }
                    libc::EOPNOTSUPP => {
                        "zoned devices cannot be migrated (zone writes bypass the region map)"
                            .to_owned()
                    }
                    libc::EMEDIUMTYPE => {
                        "the source is a bio-based device (dm, md, NVMe multipath): \
                        the writes it has in flight when blkmig attaches cannot be waited for"
                            .to_owned()
                    }
                    libc::ENOENT => {
                        "the blkmig filter is not registered (load blkmig.ko)".to_owned()
                    }
                    _ => return None,
                })
            })
        })
    }

    /// Detaches blkmig.
    pub fn detach(&self) -> Result<(), FilterError> {
        let mut arg = BlkfilterDetach { name: name() };
        // SAFETY: BLKFILTER_DETACH reads one `BlkfilterDetach`, `arg`, alive
        // for the call.
        unsafe {
            ioctl::ioctl(
                &self.file,
                Updater::<DETACH, BlkfilterDetach>::new(&mut arg),
            )
        }
        .map_err(|e| {
            self.err("cannot detach blkmig", e, |errno| {
                (errno == libc::EBUSY).then(|| {
                    "the device is in REDIRECT mode and still open: unmount it first".to_owned()
                })
            })
        })
    }

    /// Sends `cmd` with `buf` (in and out); returns the bytes written back.
    pub fn ctl(&self, cmd: CtlCmd, buf: &mut [u8]) -> Result<usize, FilterError> {
        let mut arg = BlkfilterCtl {
            name: name(),
            cmd: cmd as u32,
            optlen: u32::try_from(buf.len()).unwrap_or(u32::MAX),
            opt: buf.as_mut_ptr() as u64,
        };
        // SAFETY: BLKFILTER_CTL reads and writes one `BlkfilterCtl` (`arg`,
        // alive for the call) and at most `optlen` bytes at `opt`, which is
        // `buf`, exclusively borrowed for the call and that long.
        unsafe { ioctl::ioctl(&self.file, Updater::<CTL, BlkfilterCtl>::new(&mut arg)) }
            .map_err(|e| self.err("blkmig request failed", e, |_| None))?;
        Ok((arg.optlen as usize).min(buf.len()))
    }

    /// Sends `cmd` with a slice of plain-old-data values as its buffer.
    fn ctl_slice<T: Pod>(&self, cmd: CtlCmd, items: &mut [T]) -> Result<usize, FilterError> {
        // SAFETY: `T: Pod` is only implemented for #[repr(C)] structs of
        // integers without padding (see the trait), for which every byte
        // pattern is a valid value; the byte view covers exactly `items`,
        // which is exclusively borrowed for as long as the view lives.
        let bytes = unsafe {
            std::slice::from_raw_parts_mut(
                items.as_mut_ptr().cast::<u8>(),
                std::mem::size_of_val(items),
            )
        };
        self.ctl(cmd, bytes)
    }

    /// The filter's status.
    pub fn status(&self) -> Result<Status, FilterError> {
        let mut st = [Status::default()];
        self.ctl_slice(CtlCmd::Status, &mut st)?;
        Ok(st[0])
    }

    /// A command without payload.
    fn ctl_none(&self, cmd: CtlCmd) -> Result<(), FilterError> {
        self.ctl(cmd, &mut []).map(|_| ())
    }
}

/// Plain old data: `#[repr(C)]` structs of integers with no padding, which
/// may be viewed as bytes and filled in by the kernel.
///
/// # Safety
/// Only for types where every byte pattern is a valid value and that have
/// no padding bytes.
unsafe trait Pod: Copy {}
// SAFETY: all four are #[repr(C)] structs of u32/u64/i32 fields whose
// layout without padding is asserted in blkmig_core::abi.
unsafe impl Pod for Status {}
// SAFETY: as above.
unsafe impl Pod for RegionOp {}
// SAFETY: as above.
unsafe impl Pod for HoldRequest {}
// SAFETY: as above.
unsafe impl Pod for SyncedQuery {}
// SAFETY: a byte is plain old data.
unsafe impl Pod for u8 {}

impl Tracker for Filtered {
    fn status(&self) -> Result<Status, TrackerError> {
        Ok(Filtered::status(self)?)
    }

    fn copy_begin(&self, ops: &mut [RegionOp]) -> Result<(), TrackerError> {
        for chunk in ops.chunks_mut(abi::REGION_OPS_MAX as usize) {
            self.ctl_slice(CtlCmd::CopyBegin, chunk)?;
        }
        Ok(())
    }

    fn copy_end(&self, ops: &mut [RegionOp]) -> Result<(), TrackerError> {
        for chunk in ops.chunks_mut(abi::REGION_OPS_MAX as usize) {
            self.ctl_slice(CtlCmd::CopyEnd, chunk)?;
        }
        Ok(())
    }

    fn verify_begin(&self, ops: &mut [RegionOp]) -> Result<(), TrackerError> {
        for chunk in ops.chunks_mut(abi::REGION_OPS_MAX as usize) {
            self.ctl_slice(CtlCmd::VerifyBegin, chunk)?;
        }
        Ok(())
    }

    fn verify_end(&self, ops: &mut [RegionOp]) -> Result<(), TrackerError> {
        for chunk in ops.chunks_mut(abi::REGION_OPS_MAX as usize) {
            self.ctl_slice(CtlCmd::VerifyEnd, chunk)?;
        }
        Ok(())
    }

    fn unsync(&self, ops: &mut [RegionOp]) -> Result<(), TrackerError> {
        for chunk in ops.chunks_mut(abi::REGION_OPS_MAX as usize) {
            self.ctl_slice(CtlCmd::Unsync, chunk)?;
        }
        Ok(())
    }

    fn synced(&self, first: u64, count: u64) -> Result<Vec<bool>, TrackerError> {
        const HEAD: usize = size_of::<SyncedQuery>();
        let mut out = Vec::with_capacity(count as usize);
        let mut at = first;
        while at < first + count {
            let want = (first + count - at).min(64 * 1024);
            let mut buf = vec![0u8; HEAD + want.div_ceil(8) as usize];
            let q = SyncedQuery {
                first: at,
                count: want,
            };
            buf[..8].copy_from_slice(&q.first.to_ne_bytes());
            buf[8..16].copy_from_slice(&q.count.to_ne_bytes());
            self.ctl_slice(CtlCmd::SyncedMap, &mut buf)?;
            let got = u64::from_ne_bytes(buf[8..16].try_into().unwrap_or([0; 8])).min(want);
            if got == 0 {
                break;
            }
            out.extend((0..got).map(|i| buf[HEAD + (i / 8) as usize] & (1 << (i % 8)) != 0));
            at += got;
        }
        Ok(out)
    }

    fn hold_writes(&self, timeout_ms: u32) -> Result<(), TrackerError> {
        let mut req = [HoldRequest {
            timeout_ms,
            reserved: 0,
        }];
        self.ctl_slice(CtlCmd::HoldWrites, &mut req)?;
        Ok(())
    }

    fn switch(&self) -> Result<(), TrackerError> {
        Ok(self.ctl_none(CtlCmd::Switch)?)
    }

    fn release(&self) -> Result<(), TrackerError> {
        Ok(self.ctl_none(CtlCmd::Release)?)
    }
}
