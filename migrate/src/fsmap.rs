//! What the filesystem on the source does not use: its free space, from
//! `FS_IOC_GETFSMAP`, so that the copier can commit a free region without
//! copying it (see docs/design.md, "Skipping free space").
//!
//! The copier asks through [`FreeSpace`], so that the engine can be tested
//! with a made-up filesystem; [`Fsmap`] is the real one, an ioctl on the
//! mount point of the source's filesystem (ext4 and xfs implement it).

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use rustix::ioctl::{self, opcode};

/// A byte range `[start, end)` of the source device.
pub type Span = (u64, u64);

/// Where the free space of the source's filesystem comes from.
pub trait FreeSpace: Send + Sync + std::fmt::Debug {
    /// The ranges of `span` that the filesystem does not use, in order and
    /// disjoint, as it stands at the call. Ranges outside `span` may be
    /// clipped or left out.
    fn free(&self, span: Span) -> std::io::Result<Vec<Span>>;

    /// Makes every free-space change made so far durable (the frees in the
    /// filesystem's journal committed), so that a crash cannot bring back
    /// a block that [`FreeSpace::free`] called free.
    fn settle(&self) -> std::io::Result<()>;
}

/// Whether the free ranges `free` (sorted, disjoint) cover all of `span`.
pub fn covers(free: &[Span], span: Span) -> bool {
    let (mut at, end) = span;
    for &(s, e) in free {
        if at >= end {
            break;
        }
        if e <= at {
            continue;
        }
        if s > at {
            return false;
        }
        at = e;
    }
    at >= end
}

/// The parts of `span` that are not in `free` (sorted, disjoint).
pub fn used(free: &[Span], span: Span) -> Vec<Span> {
    let (mut at, end) = span;
    let mut out = Vec::new();
    for &(s, e) in free {
        if at >= end {
            break;
        }
        if e <= at {
            continue;
        }
        if s > at {
            out.push((at, s.min(end)));
        }
        at = at.max(e);
    }
    if at < end {
        out.push((at, end));
    }
    out
}

/// `struct fsmap` of linux/fsmap.h.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct RawFsmap {
    device: u32,
    flags: u32,
    physical: u64,
    owner: u64,
    offset: u64,
    length: u64,
    reserved: [u64; 3],
}

/// `struct fsmap_head` of linux/fsmap.h, without its records.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct RawHead {
    iflags: u32,
    oflags: u32,
    count: u32,
    entries: u32,
    reserved: [u64; 6],
    keys: [RawFsmap; 2],
}

/// Records asked for per call.
const RECS: usize = 256;

/// A head with room for [`RECS`] records after it, as the ioctl wants.
#[repr(C)]
struct Request {
    head: RawHead,
    recs: [RawFsmap; RECS],
}

/// `FS_IOC_GETFSMAP`: `_IOWR('X', 59, struct fsmap_head)`.
const FS_IOC_GETFSMAP: ioctl::Opcode = opcode::read_write::<RawHead>(b'X', 59);
/// The record is the last one of the query.
const FMR_OF_LAST: u32 = 0x20;
/// The owner is a special owner (free space, metadata...).
const FMR_OF_SPECIAL_OWNER: u32 = 0x10;
/// `FMR_OWNER(0, 1)`: free space.
const FMR_OWN_FREE: u64 = 1;

/// The kernel's encoding of a device number in `fmr_device`
/// (`new_encode_dev`).
fn encode_dev(major: u32, minor: u32) -> u32 {
    (minor & 0xff) | (major << 8) | ((minor & !0xff) << 12)
}

/// The free space of a mounted filesystem on one block device, by
/// `FS_IOC_GETFSMAP` on its mount point.
#[derive(Debug)]
pub struct Fsmap {
    dir: File,
    mount: PathBuf,
    device: u32,
}

impl Fsmap {
    /// The filesystem mounted from block device `major:minor`, if it is
    /// mounted and answers `FS_IOC_GETFSMAP` (a raw volume, or a
    /// filesystem without it, gives `None`: copy it all).
    pub fn for_device(major: u32, minor: u32) -> Option<Self> {
        let mount = crate::device::mount_point(major, minor)?;
        let m = Self::open(Path::new(&mount), major, minor).ok()?;
        // One query: the filesystem must implement it.
        m.free((0, 1 << 20)).ok()?;
        Some(m)
    }

    /// The source at `path` (a block device): [`Fsmap::for_device`].
    pub fn for_source(path: &Path) -> Option<Self> {
        use std::os::unix::fs::FileTypeExt;
        let meta = std::fs::metadata(path).ok()?;
        if !meta.file_type().is_block_device() {
            return None;
        }
        let rdev = meta.rdev();
        Self::for_device(rustix::fs::major(rdev), rustix::fs::minor(rdev))
    }

    /// The filesystem mounted on `mount`, from device `major:minor`.
    pub fn open(mount: &Path, major: u32, minor: u32) -> std::io::Result<Self> {
        Ok(Self {
            dir: File::open(mount)?,
            mount: mount.to_owned(),
            device: encode_dev(major, minor),
        })
    }

    /// Where the filesystem is mounted.
    pub fn mount(&self) -> &Path {
        &self.mount
    }

    fn query(&self, req: &mut Request) -> std::io::Result<()> {
        // SAFETY: the kernel reads the head and writes at most `count`
        // records after it; `Request` is a head followed by `RECS` records
        // and `count` is `RECS`, all alive for the call.
        unsafe {
            ioctl::ioctl(
                &self.dir,
                ioctl::Updater::<FS_IOC_GETFSMAP, Request>::new(req),
            )
        }
        .map_err(std::io::Error::from)
    }
}

impl FreeSpace for Fsmap {
    fn free(&self, (start, end): Span) -> std::io::Result<Vec<Span>> {
        let mut out: Vec<Span> = Vec::new();
        if start >= end {
            return Ok(out);
        }
        let mut req = Box::new(Request {
            head: RawHead::default(),
            recs: [RawFsmap::default(); RECS],
        });
        req.head.count = RECS as u32;
        req.head.keys[0] = RawFsmap {
            device: self.device,
            physical: start,
            ..RawFsmap::default()
        };
        req.head.keys[1] = RawFsmap {
            device: self.device,
            flags: u32::MAX,
            physical: end - 1,
            owner: u64::MAX,
            offset: u64::MAX,
            length: 0,
            reserved: [0; 3],
        };
        loop {
            self.query(&mut req)?;
            let n = (req.head.entries as usize).min(RECS);
            if n == 0 {
                return Ok(out);
            }
            for r in &req.recs[..n] {
                let free = r.flags & FMR_OF_SPECIAL_OWNER != 0 && r.owner == FMR_OWN_FREE;
                if r.device != self.device || !free {
                    continue;
                }
                let (s, e) = (
                    r.physical.max(start),
                    r.physical.saturating_add(r.length).min(end),
                );
                if s >= e {
                    continue;
                }
                match out.last_mut() {
                    Some(last) if last.1 >= s => last.1 = last.1.max(e),
                    _ => out.push((s, e)),
                }
            }
            let last = req.recs[n - 1];
            if last.flags & FMR_OF_LAST != 0 {
                return Ok(out);
            }
            // The next call starts after the last record returned.
            req.head.keys[0] = last;
        }
    }

    fn settle(&self) -> std::io::Result<()> {
        rustix::fs::syncfs(&self.dir).map_err(std::io::Error::from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_head_is_what_the_kernel_expects() {
        assert_eq!(std::mem::size_of::<RawFsmap>(), 64);
        assert_eq!(std::mem::size_of::<RawHead>(), 192);
        // _IOWR('X', 59, 192 bytes)
        assert_eq!(FS_IOC_GETFSMAP as u64, 0xc0c0_583b);
        assert_eq!(encode_dev(7, 3), 0x703);
        assert_eq!(
            encode_dev(259, 300),
            (300 & 0xff) | (259 << 8) | (256 << 12)
        );
    }

    #[test]
    fn covered_and_used_parts() {
        let free = [(0, 10), (10, 20), (30, 40)];
        assert!(covers(&free, (0, 20)));
        assert!(covers(&free, (5, 15)));
        assert!(!covers(&free, (15, 35)));
        assert!(!covers(&free, (35, 45)));
        assert!(covers(&free, (33, 33)));
        assert!(!covers(&[], (0, 1)));
        assert_eq!(used(&free, (5, 45)), vec![(20, 30), (40, 45)]);
        assert_eq!(used(&free, (0, 20)), Vec::<Span>::new());
        assert_eq!(used(&[], (3, 9)), vec![(3, 9)]);
        assert_eq!(used(&[(0, 4), (2, 6)], (0, 8)), vec![(6, 8)]);
    }
}
