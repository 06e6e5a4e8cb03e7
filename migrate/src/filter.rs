//! The blkmig filter's ioctls: attach, detach, control.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

use blkmig_core::abi::{
    self, AttachOptions, BlkfilterAttach, BlkfilterCtl, BlkfilterDetach, CtlCmd, HoldRequest,
    RegionOp, Status, SyncedQuery,
};
use rustix::ioctl::{self, opcode, Updater};

use crate::device::{DevId, Probe};
use crate::tracker::Tracker;

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

/// A request to the kernel's block-device filter hook.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Request {
    /// `BLKFILTER_ATTACH`.
    Attach,
    /// `BLKFILTER_DETACH`.
    Detach,
    /// `BLKFILTER_CTL` with a blkmig command.
    Ctl(CtlCmd),
}

impl std::fmt::Display for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let cmd = match self {
            Request::Attach => return f.write_str("cannot attach blkmig"),
            Request::Detach => return f.write_str("cannot detach blkmig"),
            Request::Ctl(c) => match c {
                CtlCmd::Status => "status",
                CtlCmd::CopyBegin => "copy-begin",
                CtlCmd::CopyEnd => "copy-end",
                CtlCmd::HoldWrites => "hold-writes",
                CtlCmd::Switch => "switch",
                CtlCmd::Release => "release",
                CtlCmd::SyncedMap => "synced-map",
                CtlCmd::VerifyBegin => "verify-begin",
                CtlCmd::VerifyEnd => "verify-end",
                CtlCmd::Unsync => "unsync",
            },
        };
        write!(f, "blkmig {cmd} request failed")
    }
}

/// An error of the filter layer: the device cannot take filter requests,
/// or the kernel refused one.
#[derive(Debug, thiserror::Error)]
pub enum FilterError {
    /// The device could not be opened for filter requests.
    #[error("cannot open {path} for filter requests", path = .path.display())]
    Open {
        /// The device.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Filter requests go to block devices only.
    #[error("{path} is not a block device: live migration moves block devices (use `migrate copy` for image files) (ENOTBLK)",
        path = .path.display())]
    NotBlock {
        /// The path given.
        path: PathBuf,
    },
    /// The running kernel has no filter hook.
    #[error("{path}: this kernel has no block-device filter hook (BLKFILTER_* ioctls): boot a kernel with the blkmig patches",
        path = .path.display())]
    NoHook {
        /// The device asked.
        path: PathBuf,
    },
    /// The hook is there, the module is not.
    #[error("{path}: the blkmig module is not loaded: modprobe blkmig", path = .path.display())]
    NoModule {
        /// The device asked.
        path: PathBuf,
    },
    /// The loaded module speaks another control ABI than this migrate.
    #[error("{path}: cannot attach blkmig: the loaded blkmig module speaks ABI {module}, this migrate ABI {ours}: install the module built with this migrate (the blkmig-module package of the same version) (EPROTO)",
        path = .path.display())]
    OtherAbi {
        /// The source.
        path: PathBuf,
        /// The loaded module's ABI (`/sys/module/blkmig/version`).
        module: u32,
        /// This migrate's.
        ours: u32,
    },
    /// blkmig is attached already.
    #[error("{path}: cannot attach blkmig: it is already attached to this device, in {mode} mode, migrating to device {major}:{minor} (EALREADY)",
        path = .path.display())]
    AlreadyAttached {
        /// The source.
        path: PathBuf,
        /// Its mode, in words.
        mode: &'static str,
        /// The target's major number.
        major: u32,
        /// The target's minor number.
        minor: u32,
    },
    /// The kernel refused a request; `errno` says why.
    #[error("{path}: {request}: {meaning} ({name})", path = .path.display(),
        meaning = meaning(*.request, *.errno), name = errno_name(.errno))]
    Refused {
        /// The filtered (source) device.
        path: PathBuf,
        /// What was asked.
        request: Request,
        /// Positive errno.
        errno: i32,
    },
}

impl FilterError {
    /// The errno behind this error, as the kernel would return it.
    pub fn errno(&self) -> i32 {
        match self {
            FilterError::Open { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
            FilterError::NotBlock { .. } => libc::ENOTBLK,
            FilterError::NoHook { .. } => libc::ENOTTY,
            FilterError::NoModule { .. } => libc::ENOENT,
            FilterError::OtherAbi { .. } => libc::EPROTO,
            FilterError::AlreadyAttached { .. } => libc::EALREADY,
            FilterError::Refused { errno, .. } => *errno,
        }
    }
}

/// What an errno means for a filter request, in words.
fn meaning(request: Request, errno: i32) -> String {
    let attach = request == Request::Attach;
    let text = match errno {
        libc::ENOTTY => "this kernel has no block-device filter hook (BLKFILTER_* ioctls): boot a kernel with the blkmig patches",
        libc::EPERM => "permission denied: filter requests need CAP_SYS_ADMIN",
        libc::EBADF => "filter requests need the device opened for writing",
        libc::ENOENT if attach => "the blkmig filter is not registered: modprobe blkmig",
        libc::ENOENT => "no blkmig filter is attached to this device",
        libc::ENODEV => "the device is going away",
        libc::EBUSY if attach => "the device already has a block-device filter attached",
        libc::EBUSY if request == Request::Detach => {
            "the device is in REDIRECT mode and still open: unmount it first"
        }
        libc::EALREADY if attach => "blkmig is already attached to this device",
        libc::ENOSPC if attach => "the target is smaller than the source",
        libc::EXDEV if attach => "the target is the source itself or overlaps it",
        libc::EINVAL if attach => {
            "the kernel refused the options (region size, block size or version)"
        }
        libc::E2BIG if attach => "the source has too many regions: use a larger --region-size",
        libc::EOPNOTSUPP if attach => {
            "zoned devices cannot be migrated (zone writes bypass the region map)"
        }
        libc::EMEDIUMTYPE if attach => {
            "the source is a bio-based device (dm, md, NVMe multipath): \
             the writes it has in flight when blkmig attaches cannot be waited for"
        }
        libc::ETIMEDOUT if request == Request::Ctl(CtlCmd::HoldWrites) => {
            "the writes in flight did not drain within the hold timeout"
        }
        libc::ETIMEDOUT if request == Request::Ctl(CtlCmd::Switch) => {
            "the hold timed out before the switch"
        }
        libc::EAGAIN if request == Request::Ctl(CtlCmd::Switch) => {
            "a region is not in sync"
        }
        _ => return errno_text(errno),
    };
    text.to_owned()
}

/// The system's description of an errno, without the "(os error N)" that
/// the standard library appends (the name is printed instead).
pub fn errno_text(errno: i32) -> String {
    let text = std::io::Error::from_raw_os_error(errno).to_string();
    match text.strip_suffix(&format!(" (os error {errno})")) {
        Some(t) => t.to_owned(),
        None => text,
    }
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
        libc::ENOTBLK => "ENOTBLK",
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

/// The control ABI the loaded blkmig module speaks, from its version
/// (`/sys/module/blkmig/version`, `abi<N>`); `None` without the module, or
/// for a module that does not say (older than ABI 4's version entry).
pub fn module_abi() -> Option<u32> {
    parse_module_version(&std::fs::read_to_string("/sys/module/blkmig/version").ok()?)
}

/// The ABI in a module version string (`abi<N>`).
fn parse_module_version(v: &str) -> Option<u32> {
    v.trim().strip_prefix("abi")?.parse().ok()
}

impl Filtered {
    /// Opens `path` for filter requests, after checking that it is a block
    /// device, that this kernel has the filter hook, and that the blkmig
    /// module is loaded (naming what is missing).
    pub fn open(path: &Path) -> Result<Self, FilterError> {
        use std::os::unix::fs::{FileTypeExt, MetadataExt};
        let md = std::fs::metadata(path).map_err(|source| FilterError::Open {
            path: path.to_owned(),
            source,
        })?;
        if !md.file_type().is_block_device() {
            return Err(FilterError::NotBlock {
                path: path.to_owned(),
            });
        }
        // Filter requests need a file opened for writing (as BLKDISCARD).
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|source| FilterError::Open {
                path: path.to_owned(),
                source,
            })?;
        let f = Self {
            path: path.to_owned(),
            file,
        };
        let (major, minor) = (rustix::fs::major(md.rdev()), rustix::fs::minor(md.rdev()));
        let no_hook = || FilterError::NoHook {
            path: path.to_owned(),
        };
        if !Path::new(&format!("/sys/dev/block/{major}:{minor}")).exists() {
            return Err(no_hook());
        }
        // A well-formed STATUS: the hook answers 0 or ENOENT; a kernel
        // without it leaves the ioctl to the driver, which answers ENOTTY
        // (or EINVAL: the loop driver).
        match f.status() {
            Ok(_) => return Ok(f),
            Err(e) if matches!(e.errno(), libc::ENOTTY | libc::EINVAL) => return Err(no_hook()),
            Err(e) if e.errno() != libc::ENOENT => return Err(e),
            Err(_) => {}
        }
        if !Path::new("/sys/module/blkmig").exists() {
            return Err(FilterError::NoModule {
                path: path.to_owned(),
            });
        }
        Ok(f)
    }

    fn err(&self, request: Request, e: rustix::io::Errno) -> FilterError {
        FilterError::Refused {
            path: self.path.clone(),
            request,
            errno: e.raw_os_error(),
        }
    }

    /// Attaches blkmig, migrating to `target`. Refused before the request
    /// if the loaded module says it speaks another ABI (the module would
    /// refuse the options with a bare EINVAL).
    pub fn attach(&self, target: &Probe, opts: AttachOptions) -> Result<(), FilterError> {
        if let Some(module) = module_abi().filter(|&v| v != abi::ABI_VERSION) {
            return Err(FilterError::OtherAbi {
                path: self.path.clone(),
                module,
                ours: abi::ABI_VERSION,
            });
        }
        let DevId::Block { major, minor } = target.id else {
            return Err(FilterError::NotBlock {
                path: target.path.clone(),
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
        .map_err(|e| self.err(Request::Attach, e))
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
        .map_err(|e| self.err(Request::Detach, e))
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
            .map_err(|e| self.err(Request::Ctl(cmd), e))?;
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

    /// A command over an array of region ops, in calls of at most
    /// `REGION_OPS_MAX` ops.
    fn region_ops(&self, cmd: CtlCmd, ops: &mut [RegionOp]) -> Result<(), FilterError> {
        for chunk in ops.chunks_mut(abi::REGION_OPS_MAX as usize) {
            self.ctl_slice(cmd, chunk)?;
        }
        Ok(())
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
// SAFETY: every bit pattern is a valid u64, which has no padding.
unsafe impl Pod for u64 {}

impl Tracker for Filtered {
    fn status(&self) -> Result<Status, FilterError> {
        Filtered::status(self)
    }

    fn copy_begin(&self, ops: &mut [RegionOp]) -> Result<(), FilterError> {
        self.region_ops(CtlCmd::CopyBegin, ops)
    }

    fn copy_end(&self, ops: &mut [RegionOp]) -> Result<(), FilterError> {
        self.region_ops(CtlCmd::CopyEnd, ops)
    }

    fn verify_begin(&self, ops: &mut [RegionOp]) -> Result<(), FilterError> {
        self.region_ops(CtlCmd::VerifyBegin, ops)
    }

    fn verify_end(&self, ops: &mut [RegionOp]) -> Result<(), FilterError> {
        self.region_ops(CtlCmd::VerifyEnd, ops)
    }

    fn unsync(&self, ops: &mut [RegionOp]) -> Result<(), FilterError> {
        self.region_ops(CtlCmd::Unsync, ops)
    }

    fn synced(&self, first: u64, count: u64) -> Result<Vec<bool>, FilterError> {
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

    fn hold_writes(&self, timeout_ms: u32) -> Result<(), FilterError> {
        let mut req = [HoldRequest {
            timeout_ms,
            reserved: 0,
        }];
        self.ctl_slice(CtlCmd::HoldWrites, &mut req)?;
        Ok(())
    }

    fn switch(&self, head_writes: u64) -> Result<(), FilterError> {
        let mut w = [head_writes];
        self.ctl_slice(CtlCmd::Switch, &mut w).map(|_| ())
    }

    fn release(&self) -> Result<(), FilterError> {
        self.ctl_none(CtlCmd::Release)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_module_version_names_its_abi() {
        assert_eq!(parse_module_version("abi4\n"), Some(4));
        assert_eq!(parse_module_version("abi12"), Some(12));
        assert_eq!(parse_module_version("4"), None);
        assert_eq!(parse_module_version("abi"), None);
        assert_eq!(parse_module_version("abix"), None);
        assert_eq!(parse_module_version(""), None);
    }
}
