//! Block devices and image files: identity, geometry, safety checks and
//! positioned O_DIRECT I/O.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use rustix::fs::{FallocateFlags, StatxFlags};
use rustix::ioctl::{self, opcode, Getter};

use crate::error::{Error, Op, Refusal, Result};
use crate::units::Bytes;

/// What a path is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A block device node.
    Block,
    /// A regular file (a disk image).
    File,
}

/// Identity of a device or file, to tell whether two paths are the same.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DevId {
    /// A block device, by major and minor number.
    Block {
        /// Major number.
        major: u32,
        /// Minor number.
        minor: u32,
    },
    /// A regular file, by filesystem device and inode.
    File {
        /// Device of the filesystem holding it.
        dev: u64,
        /// Inode number.
        ino: u64,
    },
}

/// What a path is, found without opening it.
#[derive(Clone, Debug)]
pub struct Probe {
    /// The path as given.
    pub path: PathBuf,
    /// Block device or file.
    pub kind: Kind,
    /// Identity.
    pub id: DevId,
}

impl Probe {
    /// Looks `path` up; refuses anything but a block device or regular file.
    pub fn new(path: &Path) -> Result<Self> {
        let md = std::fs::metadata(path).map_err(|e| Error::io(Op::Stat, path, 0, e))?;
        let ft = md.file_type();
        let (kind, id) = if ft.is_block_device() {
            let rdev = md.rdev();
            (
                Kind::Block,
                DevId::Block {
                    major: rustix::fs::major(rdev),
                    minor: rustix::fs::minor(rdev),
                },
            )
        } else if ft.is_file() {
            (
                Kind::File,
                DevId::File {
                    dev: md.dev(),
                    ino: md.ino(),
                },
            )
        } else {
            return Err(Error::refused(path, Refusal::NotADevice));
        };
        Ok(Self {
            path: path.to_owned(),
            kind,
            id,
        })
    }

    /// Refuses a second path that is the same device or file as this one, or
    /// a partition of it, or its whole disk.
    pub fn check_distinct(&self, other: &Probe) -> Result<()> {
        if self.id == other.id {
            return Err(Error::refused(
                &other.path,
                Refusal::SameDevice(self.path.clone()),
            ));
        }
        if let (DevId::Block { .. }, DevId::Block { .. }) = (self.id, other.id) {
            if parent_disk(self.id) == Some(other.id) || parent_disk(other.id) == Some(self.id) {
                return Err(Error::refused(
                    &other.path,
                    Refusal::Overlaps(self.path.clone()),
                ));
            }
        }
        Ok(())
    }

    /// Refuses a mounted block device (naming the mount point) or an image
    /// file that backs a loop device.
    pub fn check_unused(&self) -> Result<()> {
        match self.id {
            DevId::Block { major, minor } => {
                if let Some(mnt) = mount_point(major, minor) {
                    return Err(Error::refused(&self.path, Refusal::Mounted(mnt)));
                }
            }
            DevId::File { dev, ino } => {
                if let Some(loopdev) = loop_backed_by(dev, ino) {
                    return Err(Error::refused(&self.path, Refusal::LoopBacking(loopdev)));
                }
            }
        }
        Ok(())
    }
}

impl Probe {
    /// The sysfs directory of the whole disk of a block device (of the
    /// device itself if it is a whole disk).
    fn sysfs_disk(&self) -> Option<PathBuf> {
        let DevId::Block { major, minor } = self.id else {
            return None;
        };
        let sys = PathBuf::from(format!("/sys/dev/block/{major}:{minor}"));
        Some(if sys.join("partition").exists() {
            sys.join("..")
        } else {
            sys
        })
    }

    /// Refuses a zoned block device: zone appends and zone resets write
    /// without going through the filter's region accounting.
    pub fn check_not_zoned(&self) -> Result<()> {
        let Some(disk) = self.sysfs_disk() else {
            return Ok(());
        };
        match std::fs::read_to_string(disk.join("queue/zoned")) {
            Ok(model) if model.trim() != "none" => Err(Error::refused(
                &self.path,
                Refusal::Zoned(model.trim().to_owned()),
            )),
            _ => Ok(()),
        }
    }

    /// Refuses a block device whose disk is bio-based (dm, md, NVMe
    /// multipath): blk-mq disks have an `mq` directory in sysfs, and only
    /// for them can the kernel wait, at attach, for the writes already in
    /// flight.
    pub fn check_request_based(&self) -> Result<()> {
        let Some(disk) = self.sysfs_disk() else {
            return Ok(());
        };
        if disk.exists() && !disk.join("mq").exists() {
            return Err(Error::refused(&self.path, Refusal::BioBased));
        }
        Ok(())
    }
}

/// The whole disk a partition belongs to, from sysfs.
fn parent_disk(id: DevId) -> Option<DevId> {
    let DevId::Block { major, minor } = id else {
        return None;
    };
    let sys = PathBuf::from(format!("/sys/dev/block/{major}:{minor}"));
    if !sys.join("partition").exists() {
        return None;
    }
    let dev = std::fs::read_to_string(sys.join("../dev")).ok()?;
    let (ma, mi) = dev.trim().split_once(':')?;
    Some(DevId::Block {
        major: ma.parse().ok()?,
        minor: mi.parse().ok()?,
    })
}

/// Where block device `major:minor` is mounted, from /proc/self/mountinfo.
pub fn mount_point(major: u32, minor: u32) -> Option<String> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let want = format!("{major}:{minor}");
    info.lines().find_map(|line| {
        let mut f = line.split(' ');
        let (_id, _parent, dev, _root, mnt) =
            (f.next()?, f.next()?, f.next()?, f.next()?, f.next()?);
        (dev == want).then(|| mnt.replace("\\040", " "))
    })
}

/// The loop device, if any, whose backing file is inode `ino` on `dev`.
fn loop_backed_by(dev: u64, ino: u64) -> Option<String> {
    let entries = std::fs::read_dir("/sys/block").ok()?;
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.starts_with("loop") {
            continue;
        }
        let Ok(backing) = std::fs::read_to_string(e.path().join("loop/backing_file")) else {
            continue;
        };
        if let Ok(md) = std::fs::metadata(backing.trim()) {
            if md.dev() == dev && md.ino() == ino {
                return Some(format!("/dev/{name}"));
            }
        }
    }
    None
}

/// How to open a device.
#[derive(Clone, Copy, Debug)]
pub struct Access {
    /// Open for writing too.
    pub write: bool,
    /// Bypass the page cache (O_DIRECT).
    pub direct: bool,
    /// Claim a block device exclusively (O_EXCL): fails while mounted or held.
    pub exclusive: bool,
}

/// An open device or image file.
#[derive(Debug)]
pub struct Device {
    probe: Probe,
    file: File,
    size: Bytes,
    block_size: u32,
    mem_align: usize,
}

/// The most [`Device::read_exact_nowait_at`] reads in one call: one bio
/// that no device's limits split (16 pages).
pub const NOWAIT_CHUNK: usize = 64 << 10;

const BLKGETSIZE64: ioctl::Opcode = opcode::read::<u64>(0x12, 114);
/// `_IO(0x12, 127)` in the header, but the kernel reads a `u64[2]` (start,
/// length) through the argument, so it is issued as a setter of that.
const BLKZEROOUT: ioctl::Opcode = opcode::none(0x12, 127);

impl Device {
    /// Opens a probed path. Refuses a busy block device when `exclusive`.
    pub fn open(probe: &Probe, access: Access) -> Result<Self> {
        let path = &probe.path;
        let mut flags = 0;
        if access.direct {
            flags |= libc::O_DIRECT;
        }
        if access.exclusive && probe.kind == Kind::Block {
            flags |= libc::O_EXCL;
        }
        let open = |flags| {
            OpenOptions::new()
                .read(true)
                .write(access.write)
                .custom_flags(flags)
                .open(path)
        };
        let file = match open(flags) {
            Ok(f) => f,
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                return Err(Error::refused(path, Refusal::Busy));
            }
            // A filesystem without O_DIRECT support (old tmpfs): buffered.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) && access.direct => {
                tracing::warn!(path = %path.display(), "O_DIRECT not supported, using buffered I/O");
                open(flags & !libc::O_DIRECT).map_err(|e| Error::io(Op::Open, path, 0, e))?
            }
            Err(e) => return Err(Error::io(Op::Open, path, 0, e)),
        };
        let geo = |e: rustix::io::Errno| Error::io(Op::Geometry, path, 0, e.into());
        let (size, block_size, mem_align) = match probe.kind {
            Kind::Block => {
                // SAFETY: BLKGETSIZE64 writes exactly one u64, which is the
                // Getter's output type.
                let size = unsafe { ioctl::ioctl(&file, Getter::<BLKGETSIZE64, u64>::new()) }
                    .map_err(geo)?;
                let bs = rustix::fs::ioctl_blksszget(&file).map_err(geo)?;
                (size, bs, bs as usize)
            }
            Kind::File => {
                let size = file
                    .metadata()
                    .map_err(|e| Error::io(Op::Geometry, path, 0, e))?
                    .len();
                let (bs, mem) = rustix::fs::statx(
                    &file,
                    "",
                    rustix::fs::AtFlags::EMPTY_PATH,
                    StatxFlags::DIOALIGN,
                )
                .ok()
                .filter(|s| s.stx_dio_offset_align != 0)
                .map(|s| (s.stx_dio_offset_align, s.stx_dio_mem_align as usize))
                .unwrap_or((512, 4096));
                (size, bs, mem)
            }
        };
        if !block_size.is_power_of_two() || !mem_align.is_power_of_two() {
            return Err(Error::io(
                Op::Geometry,
                path,
                0,
                io::Error::other(format!(
                    "odd block size {block_size} / alignment {mem_align}"
                )),
            ));
        }
        if size == 0 {
            return Err(Error::refused(path, Refusal::Empty));
        }
        if !size.is_multiple_of(u64::from(block_size)) {
            return Err(Error::refused(
                path,
                Refusal::UnalignedSize {
                    size,
                    block: block_size,
                },
            ));
        }
        Ok(Self {
            probe: probe.clone(),
            file,
            size: Bytes(size),
            block_size,
            mem_align: mem_align.max(block_size as usize),
        })
    }

    /// The path it was opened by.
    pub fn path(&self) -> &Path {
        &self.probe.path
    }

    /// Block device or file.
    pub fn kind(&self) -> Kind {
        self.probe.kind
    }

    /// Its identity.
    pub fn id(&self) -> DevId {
        self.probe.id
    }

    /// Size in bytes.
    pub fn size(&self) -> Bytes {
        self.size
    }

    /// Logical block size: I/O offsets and lengths are multiples of it.
    pub fn block_size(&self) -> u32 {
        self.block_size
    }

    /// Alignment I/O buffers need.
    pub fn mem_align(&self) -> usize {
        self.mem_align
    }

    /// Reads exactly `buf.len()` bytes at `offset` (a short read, past the
    /// end of a device that shrank, is an `UnexpectedEof` error).
    pub fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.file
            .read_exact_at(buf, offset)
            .map_err(|e| Error::io(Op::Read, self.path(), offset, e))
    }

    /// Reads exactly `buf.len()` bytes at `offset` without waiting for
    /// I/O the read would have to wait for (`RWF_NOWAIT`: cached pages
    /// under writeback, a busy queue). `Ok(false)`: it would have waited
    /// (`EAGAIN`, or a file that does not support it), nothing is read.
    /// It reads at most [`NOWAIT_CHUNK`] bytes a call: the block layer
    /// answers `EAGAIN` to a `REQ_NOWAIT` read that needs more than one
    /// bio, or a bio that must be split.
    pub fn read_exact_nowait_at(&self, buf: &mut [u8], offset: u64) -> Result<bool> {
        let mut done = 0;
        while done < buf.len() {
            let at = offset + done as u64;
            let end = buf.len().min(done + NOWAIT_CHUNK);
            let mut iov = [io::IoSliceMut::new(&mut buf[done..end])];
            match rustix::io::preadv2(&self.file, &mut iov, at, rustix::io::ReadWriteFlags::NOWAIT)
            {
                Ok(0) => {
                    let eof = io::Error::from(io::ErrorKind::UnexpectedEof);
                    return Err(Error::io(Op::Read, self.path(), at, eof));
                }
                Ok(n) => done += n,
                Err(rustix::io::Errno::INTR) => {}
                Err(rustix::io::Errno::AGAIN | rustix::io::Errno::OPNOTSUPP) => return Ok(false),
                Err(e) => return Err(Error::io(Op::Read, self.path(), at, e.into())),
            }
        }
        Ok(true)
    }

    /// Writes back the cached pages of `len` bytes at `offset` and waits
    /// for their writeback (`sync_file_range` with `WAIT_BEFORE`, `WRITE`
    /// and `WAIT_AFTER`); nothing is flushed to the medium.
    pub fn write_back(&self, offset: u64, len: u64) -> Result<()> {
        use std::os::fd::AsRawFd;
        let flags = libc::SYNC_FILE_RANGE_WAIT_BEFORE
            | libc::SYNC_FILE_RANGE_WRITE
            | libc::SYNC_FILE_RANGE_WAIT_AFTER;
        let (Ok(o), Ok(n)) = (i64::try_from(offset), i64::try_from(len)) else {
            return Ok(());
        };
        // SAFETY: sync_file_range takes integers only; the descriptor is
        // open for as long as `self`.
        let r = unsafe { libc::sync_file_range(self.file.as_raw_fd(), o, n, flags) };
        if r != 0 {
            let e = io::Error::last_os_error();
            return Err(Error::io(Op::Flush, self.path(), offset, e));
        }
        Ok(())
    }

    /// Writes all of `buf` at `offset`.
    pub fn write_all_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.file
            .write_all_at(buf, offset)
            .map_err(|e| Error::io(Op::Write, self.path(), offset, e))
    }

    /// Makes `len` bytes at `offset` read back as zeros without writing
    /// them: BLKZEROOUT on a block device, a punched hole in a file.
    pub fn zero_range(&self, offset: u64, len: u64) -> Result<()> {
        let err = |e: rustix::io::Errno| Error::io(Op::Zero, self.path(), offset, e.into());
        match self.kind() {
            Kind::Block => {
                let range = [offset, len];
                // SAFETY: BLKZEROOUT reads two u64 (start, length) from the
                // pointer, which points at `range`, alive for the call.
                unsafe {
                    ioctl::ioctl(
                        &self.file,
                        ioctl::Setter::<BLKZEROOUT, [u64; 2]>::new(range),
                    )
                }
                .map_err(err)
            }
            Kind::File => rustix::fs::fallocate(
                &self.file,
                FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
                offset,
                len,
            )
            .map_err(err),
        }
    }

    /// Makes everything written durable (fsync; flushes a device's cache).
    pub fn flush(&self) -> Result<()> {
        self.file
            .sync_all()
            .map_err(|e| Error::io(Op::Flush, self.path(), 0, e))
    }
}
