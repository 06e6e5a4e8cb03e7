//! One error type for device work: what failed, on which path, at which
//! offset. `Display` never repeats the underlying OS error; callers print the
//! source chain ([`describe`] words an OS error once, with its errno name).

use std::io;
use std::path::{Path, PathBuf};

use crate::units::Bytes;

/// The operation that failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// Looking the path up.
    Stat,
    /// Opening it.
    Open,
    /// Asking its size or block size.
    Geometry,
    /// Reading.
    Read,
    /// Writing.
    Write,
    /// Zeroing or punching a hole.
    Zero,
    /// Flushing.
    Flush,
    /// A block-device filter ioctl.
    Filter,
}

impl std::fmt::Display for Op {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Op::Stat => "cannot look up",
            Op::Open => "cannot open",
            Op::Geometry => "cannot read the size of",
            Op::Read => "read failed on",
            Op::Write => "write failed on",
            Op::Zero => "zeroing failed on",
            Op::Flush => "flush failed on",
            Op::Filter => "filter request failed on",
        })
    }
}

/// Why blkmig refuses to work on a device, before touching anything.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// Neither a block device nor a regular file.
    #[error("is not a block device or a regular file")]
    NotADevice,
    /// Live migration needs a block device.
    #[error("is not a block device: live migration moves block devices (use `migrate copy` for image files)")]
    NotBlock,
    /// Mounted (we know where).
    #[error("is mounted on {0}")]
    Mounted(String),
    /// Opened exclusively by someone else (a mount, dm, md, another tool).
    #[error("is in use: mounted or held open exclusively by another program")]
    Busy,
    /// An image file backs a loop device.
    #[error("backs loop device {0}; detach it first")]
    LoopBacking(String),
    /// Source and target are the same device or file.
    #[error("is the same device as {0}")]
    SameDevice(PathBuf),
    /// One is a partition of the other.
    #[error("overlaps {0} (one is a partition of the other)")]
    Overlaps(PathBuf),
    /// Target smaller than the source.
    #[error("is too small: {target_size} ({target_bytes} bytes) is less than the source's {source_size} ({source_bytes} bytes)",
        target_bytes = .target_size.0, source_bytes = .source_size.0)]
    TooSmall {
        /// Target size.
        target_size: Bytes,
        /// Source size.
        source_size: Bytes,
    },
    /// Size not a whole number of logical blocks.
    #[error("has a size of {size} bytes, not a multiple of its {block}-byte blocks")]
    UnalignedSize {
        /// Size in bytes.
        size: u64,
        /// Logical block size.
        block: u32,
    },
    /// Empty device.
    #[error("is empty")]
    Empty,
    /// A zoned device.
    #[error("is a zoned block device ({0}): zone appends and resets would bypass the migration's write tracking")]
    Zoned(String),
    /// A bio-based source.
    #[error("is a bio-based device (dm, md, NVMe multipath): the writes it has in flight when blkmig attaches cannot be waited for, so a live migration could miss one")]
    BioBased,
    /// Target blocks larger than the source's.
    #[error("has {target_block}-byte logical blocks, larger than the source's {source_block}-byte blocks: a {source_block}-byte write to the source could not be mirrored to it")]
    BlockSize {
        /// The target's logical block size.
        target_block: u32,
        /// The source's logical block size.
        source_block: u32,
    },
    /// The state directory is on the device itself.
    #[error("holds the state directory {0}: the source's saved head must survive the switch and a crash inside it; use --state-dir on another disk")]
    HoldsStateDir(PathBuf),
    /// The region map would be too large.
    #[error("needs {regions} regions of {region_bytes} bytes, more than the {max} a migration may have: use --region-size {suggest} or larger")]
    TooManyRegions {
        /// Regions the source would have.
        regions: u64,
        /// Region size asked for.
        region_bytes: u64,
        /// The module's limit.
        max: u64,
        /// The smallest region size that fits, in bytes.
        suggest: u64,
    },
}

impl Refusal {
    /// The errno the kernel uses for the same refusal.
    pub fn errno_name(&self) -> &'static str {
        match self {
            Refusal::NotADevice | Refusal::NotBlock => "ENOTBLK",
            Refusal::Mounted(_)
            | Refusal::Busy
            | Refusal::LoopBacking(_)
            | Refusal::HoldsStateDir(_) => "EBUSY",
            Refusal::SameDevice(_) | Refusal::Overlaps(_) => "EXDEV",
            Refusal::TooSmall { .. } => "ENOSPC",
            Refusal::UnalignedSize { .. } | Refusal::Empty | Refusal::BlockSize { .. } => "EINVAL",
            Refusal::TooManyRegions { .. } => "E2BIG",
            Refusal::BioBased => "EMEDIUMTYPE",
            Refusal::Zoned(_) => "EOPNOTSUPP",
        }
    }
}

/// An error of device work.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An I/O or system call failed.
    #[error("{op} {path}{at}", path = .path.display(), at = at_offset(*.op, *.offset))]
    Io {
        /// What was being done.
        op: Op,
        /// On which device or file.
        path: PathBuf,
        /// At which byte offset (0 where it does not apply).
        offset: u64,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A refusal: nothing was changed. The errno name matches what the
    /// kernel returns for the same refusal, for automation to match on.
    #[error("{path} {reason} ({name})", path = .path.display(), name = .reason.errno_name())]
    Refused {
        /// The device refused.
        path: PathBuf,
        /// Why.
        reason: Refusal,
    },
    /// Region size not usable with these devices.
    #[error("cannot use a region size of {region}: it must be a power of two from 4 KiB to 1 GiB and a multiple of the {block}-byte logical block size")]
    RegionSize {
        /// Requested region size.
        region: Bytes,
        /// Largest logical block size of the two devices.
        block: u32,
    },
    /// Not even one region's buffer fits in memory.
    #[error("a region of {region} needs a buffer of that size, more than half the memory available ({available}): use a smaller --region-size")]
    Memory {
        /// The buffer one region needs.
        region: Bytes,
        /// MemAvailable.
        available: Bytes,
    },
    /// Verification found a region that differs.
    #[error("verification failed: region {region} (bytes {offset}..{end}) differs between {source_path} and {target_path}",
        end = .offset + .len, source_path = .source_path.display(), target_path = .target_path.display())]
    Mismatch {
        /// Region index.
        region: u64,
        /// Byte offset of the region.
        offset: u64,
        /// Region length.
        len: u64,
        /// Source path.
        source_path: PathBuf,
        /// Target path.
        target_path: PathBuf,
    },
    /// The operation was interrupted (Ctrl-C).
    #[error("interrupted")]
    Interrupted,
    /// A worker panicked: a bug, not something the operator did.
    #[error(
        "internal error: a {task} worker panicked; this is a bug in migrate, please report it"
    )]
    Panicked {
        /// What the worker was doing.
        task: &'static str,
    },
}

impl Error {
    /// An I/O error with its context.
    pub fn io(op: Op, path: &Path, offset: u64, source: io::Error) -> Self {
        Error::Io {
            op,
            path: path.to_owned(),
            offset,
            source,
        }
    }

    /// A refusal for `path`.
    pub fn refused(path: &Path, reason: Refusal) -> Self {
        Error::Refused {
            path: path.to_owned(),
            reason,
        }
    }

    /// The OS error number behind this error, if any.
    pub fn raw_os_error(&self) -> Option<i32> {
        match self {
            Error::Io { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }
}

impl Error {
    /// The error of a task that did not return: a panic is a bug; a task
    /// cancelled by the runtime shutting down is an interruption.
    pub fn joined(e: &tokio::task::JoinError, task: &'static str) -> Self {
        if e.is_panic() {
            Error::Panicked { task }
        } else {
            Error::Interrupted
        }
    }
}

/// One link of an error chain in words: an OS error as its description and
/// errno name (`No such file or directory (ENOENT)`), printed once.
pub fn describe(e: &(dyn std::error::Error + 'static)) -> String {
    match e
        .downcast_ref::<io::Error>()
        .and_then(io::Error::raw_os_error)
    {
        Some(n) => format!(
            "{} ({})",
            crate::filter::errno_text(n),
            crate::filter::errno_name(&n)
        ),
        None => e.to_string(),
    }
}

/// An error and its causes in words, each once, joined by `: `.
pub fn chain_text(e: &(dyn std::error::Error + 'static)) -> String {
    let words: Vec<String> = std::iter::successors(Some(e), |e| e.source())
        .map(describe)
        .collect();
    words.join(": ")
}

fn at_offset(op: Op, offset: u64) -> String {
    match op {
        Op::Read | Op::Write | Op::Zero => format!(" at offset {offset}"),
        _ => String::new(),
    }
}

/// Result of device work.
pub type Result<T, E = Error> = std::result::Result<T, E>;
