// SPDX-License-Identifier: GPL-2.0-only
//! The ioctl ABI shared by the `blkmig` kernel module and `migrate`.
//!
//! Two layers:
//! - the generic block-device filter ioctls added by the kernel patch
//!   (`BLKFILTER_ATTACH`, `BLKFILTER_DETACH`, `BLKFILTER_CTL`), mirrored from
//!   `include/uapi/linux/blk-filter.h`;
//! - blkmig's own payloads, carried in the `opt` buffer of those ioctls.
//!
//! Every struct is `#[repr(C)]`, has no implicit padding, and its size and
//! field offsets are asserted at compile time, so a layout change is a build
//! error on both sides rather than silent corruption.

/// Length of a filter name, including the terminating NUL.
pub const BLKFILTER_NAME_LENGTH: usize = 32;

/// The name blkmig registers its filter under.
pub const FILTER_NAME: &[u8] = b"blkmig";

/// `BLKFILTER_ATTACH` argument: attach filter `name` with options `opt`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlkfilterAttach {
    /// NUL-terminated filter name.
    pub name: [u8; BLKFILTER_NAME_LENGTH],
    /// User pointer to the filter's options.
    pub opt: u64,
    /// Length of the options in bytes (at most [`BLKFILTER_OPT_MAX`]).
    pub optlen: u32,
    /// Must be zero.
    pub reserved: u32,
}

/// `BLKFILTER_DETACH` argument: detach filter `name`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlkfilterDetach {
    /// NUL-terminated filter name.
    pub name: [u8; BLKFILTER_NAME_LENGTH],
}

/// `BLKFILTER_CTL` argument: send command `cmd` to the attached filter `name`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlkfilterCtl {
    /// NUL-terminated filter name.
    pub name: [u8; BLKFILTER_NAME_LENGTH],
    /// Filter-specific command ([`CtlCmd`] for blkmig).
    pub cmd: u32,
    /// In: size of the buffer at `opt`. Out: bytes the filter wrote back.
    pub optlen: u32,
    /// User pointer to the command's buffer (in and out).
    pub opt: u64,
}

/// Largest options buffer `BLKFILTER_ATTACH` accepts.
pub const BLKFILTER_OPT_MAX: u32 = 4096;

/// The ioctl "type" of the block layer (`BLKROSET` and friends use it too).
pub const BLK_IOCTL_TYPE: u8 = 0x12;
/// ioctl number of `BLKFILTER_ATTACH` (`_IOW(0x12, 140, struct blkfilter_attach)`).
pub const BLKFILTER_ATTACH_NR: u8 = 140;
/// ioctl number of `BLKFILTER_DETACH` (`_IOW(0x12, 141, struct blkfilter_detach)`).
pub const BLKFILTER_DETACH_NR: u8 = 141;
/// ioctl number of `BLKFILTER_CTL` (`_IOWR(0x12, 142, struct blkfilter_ctl)`).
pub const BLKFILTER_CTL_NR: u8 = 142;

const IOC_WRITE: u32 = 1;
const IOC_READ: u32 = 2;
const fn ioc(dir: u32, nr: u8, size: usize) -> u32 {
    (dir << 30) | ((size as u32) << 16) | ((BLK_IOCTL_TYPE as u32) << 8) | nr as u32
}
/// Full request code of `BLKFILTER_ATTACH`.
pub const BLKFILTER_ATTACH: u32 = ioc(
    IOC_WRITE,
    BLKFILTER_ATTACH_NR,
    core::mem::size_of::<BlkfilterAttach>(),
);
/// Full request code of `BLKFILTER_DETACH`.
pub const BLKFILTER_DETACH: u32 = ioc(
    IOC_WRITE,
    BLKFILTER_DETACH_NR,
    core::mem::size_of::<BlkfilterDetach>(),
);
/// Full request code of `BLKFILTER_CTL`.
pub const BLKFILTER_CTL: u32 = ioc(
    IOC_READ | IOC_WRITE,
    BLKFILTER_CTL_NR,
    core::mem::size_of::<BlkfilterCtl>(),
);

/// Version of blkmig's own payloads; bumped on any incompatible change.
pub const ABI_VERSION: u32 = 4;

/// Smallest and largest region size, as log2 of bytes (4 KiB .. 1 GiB).
pub const REGION_SHIFT_MIN: u32 = 12;
/// See [`REGION_SHIFT_MIN`].
pub const REGION_SHIFT_MAX: u32 = 30;
/// Default region size: 1 MiB.
pub const REGION_SHIFT_DEFAULT: u32 = 20;
/// Most regions one migration may have: the region map takes 8 bytes a
/// region (128 MiB at this limit, for example 16 TiB in 1 MiB regions).
/// Attach refuses more with `E2BIG`.
pub const REGIONS_MAX: u64 = 1 << 24;
/// Default for how long writes may be held for a switch, in milliseconds.
pub const HOLD_TIMEOUT_MS_DEFAULT: u32 = 5000;
/// Longest hold the module accepts, in milliseconds.
pub const HOLD_TIMEOUT_MS_MAX: u32 = 60_000;

/// blkmig's `BLKFILTER_ATTACH` options.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AttachOptions {
    /// Must be [`ABI_VERSION`].
    pub version: u32,
    /// log2 of the region size in bytes, [`REGION_SHIFT_MIN`]..=[`REGION_SHIFT_MAX`].
    pub region_shift: u32,
    /// Major number of the target block device.
    pub target_major: u32,
    /// Minor number of the target block device.
    pub target_minor: u32,
    /// Hold timeout for the switch in ms; 0 means [`HOLD_TIMEOUT_MS_DEFAULT`].
    pub hold_timeout_ms: u32,
    /// Reserved, must be zero.
    pub flags: u32,
}

/// Commands of `BLKFILTER_CTL` for the blkmig filter.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CtlCmd {
    /// Out: [`Status`].
    Status = 1,
    /// In/out: array of [`RegionOp`]; out `word` is the epoch word to commit with.
    /// With [`REGION_OP_HOLD`] in `flags`, writes to the region are held
    /// until its `CopyEnd` (see [`REGION_OP_HOLD`]).
    CopyBegin = 2,
    /// In/out: array of [`RegionOp`] with the words `CopyBegin` returned.
    /// Ends the region's hold, whatever the result.
    CopyEnd = 3,
    /// In: [`HoldRequest`]. Queue new writes and drain in-flight ones.
    HoldWrites = 4,
    /// In: a `u64`, the `Status::head_writes` the copier saw
    /// when it read and saved the source's head: `EAGAIN` (still holding)
    /// if a write reached the head since. All regions synced: flush the
    /// target, retire the source, write the target's head, redirect.
    Switch = 5,
    /// No payload. Release held writes and cancel the switch.
    Release = 6,
    /// In/out: [`SyncedQuery`] followed by a bitmap of SYNCED bits.
    SyncedMap = 7,
    /// In/out: array of [`RegionOp`]. For each SYNCED region with no write
    /// in flight, `word` is its word now: a comparison of the region on
    /// both devices made from here on holds if `VerifyEnd` finds it
    /// unchanged. `REGION_BUSY` or `REGION_NOT_SYNCED` otherwise. The
    /// comparison leaves out the head (`Geometry::head_len`): the target's
    /// head is blank until the switch.
    VerifyBegin = 8,
    /// In/out: array of [`RegionOp`] with the words `VerifyBegin` returned:
    /// `REGION_OK` if no write was submitted to the region since (the
    /// comparison holds), `REGION_CONFLICT` if one was (compare again).
    VerifyEnd = 9,
    /// In/out: array of [`RegionOp`]: clear SYNCED (a region whose copy
    /// failed verification is copied again). `word` must be 0.
    /// `REGION_NOT_CLONING` once the switch has begun.
    Unsync = 10,
}

impl CtlCmd {
    /// The command for a raw number, if it is one.
    pub const fn from_raw(raw: u32) -> Option<Self> {
        Some(match raw {
            1 => Self::Status,
            2 => Self::CopyBegin,
            3 => Self::CopyEnd,
            4 => Self::HoldWrites,
            5 => Self::Switch,
            6 => Self::Release,
            7 => Self::SyncedMap,
            8 => Self::VerifyBegin,
            9 => Self::VerifyEnd,
            10 => Self::Unsync,
            _ => return None,
        })
    }
}

/// Filter mode as reported by [`Status::mode`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Reads go to the source, writes to synced regions are mirrored.
    Clone = 0,
    /// Every bio goes to the target.
    Redirect = 1,
    /// A target write failed: mirroring stopped, the source stays authoritative.
    Failed = 2,
}

impl Mode {
    /// The mode for a raw number, if it is one.
    pub const fn from_raw(raw: u32) -> Option<Self> {
        Some(match raw {
            0 => Self::Clone,
            1 => Self::Redirect,
            2 => Self::Failed,
            _ => return None,
        })
    }
}

/// Why a migration is in [`Mode::Failed`], reported by [`Status::failure`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// Not failed.
    None = 0,
    /// A mirrored write to the target failed (errno in `failure_errno`).
    TargetWrite = 1,
    /// A flush of the target failed.
    TargetFlush = 2,
    /// The target device went away.
    TargetGone = 3,
    /// The source changed size while it was cloned (writes past the size
    /// it had at attach are not tracked).
    SourceResized = 4,
    /// A write reached part of the source's sectors through another device
    /// (its whole disk, or an overlapping partition) and could not be
    /// mirrored.
    PartialWrite = 5,
    /// More writes were in flight than a region word can count.
    TooManyWrites = 6,
    /// A clone of a write could not be allocated.
    NoMemory = 7,
    /// The switch could not read the source's head before retiring it.
    SourceRead = 8,
}

impl Failure {
    /// The failure for a raw number, if it is one.
    pub const fn from_raw(raw: u32) -> Option<Self> {
        Some(match raw {
            0 => Self::None,
            1 => Self::TargetWrite,
            2 => Self::TargetFlush,
            3 => Self::TargetGone,
            4 => Self::SourceResized,
            5 => Self::PartialWrite,
            6 => Self::TooManyWrites,
            7 => Self::NoMemory,
            8 => Self::SourceRead,
            _ => return None,
        })
    }
}

/// `Status::flags` bit: writes are currently held for a switch.
pub const STATUS_HOLDING: u32 = 1 << 0;
/// `Status::flags` bit: the switch could not confirm the retire marker on
/// the source (a marker write that did not complete in time, or failed and
/// could not be undone), and switched anyway because the target held every
/// byte: the source may still look like the filesystem.
pub const STATUS_RETIRE_FAILED: u32 = 1 << 1;
/// `Status::flags` bit: a switch failed while it wrote the target's head,
/// and zeros could not be written over it: the target may look like the
/// filesystem (wipe its first 128 KiB before reusing it).
pub const STATUS_TARGET_HEAD_DIRTY: u32 = 1 << 2;

/// Reply of [`CtlCmd::Status`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Status {
    /// [`ABI_VERSION`] of the module.
    pub version: u32,
    /// A [`Mode`].
    pub mode: u32,
    /// log2 of the region size.
    pub region_shift: u32,
    /// `STATUS_*` bits.
    pub flags: u32,
    /// Size of the source in 512-byte sectors.
    pub source_sectors: u64,
    /// Size of the target in 512-byte sectors.
    pub target_sectors: u64,
    /// Number of regions.
    pub regions_total: u64,
    /// Regions with SYNCED set.
    pub regions_synced: u64,
    /// Commits that failed because a write raced the copy.
    pub copy_conflicts: u64,
    /// Copy begins refused because a write was in flight.
    pub copy_busy: u64,
    /// Write bios seen in CLONE mode.
    pub writes_seen: u64,
    /// Write bios mirrored to the target.
    pub writes_mirrored: u64,
    /// Write bios currently held for a switch.
    pub writes_held: u64,
    /// Bios redirected to the target (REDIRECT mode).
    pub bios_redirected: u64,
    /// A [`Failure`].
    pub failure: u32,
    /// Positive errno of the failure, 0 if none.
    pub failure_errno: i32,
    /// Target device number.
    pub target_major: u32,
    /// Target device number.
    pub target_minor: u32,
    /// This attachment's random identity: it is written into the retire
    /// marker, so that the saved head of a source is matched to its marker.
    pub migration_id: u64,
    /// Write holds so far (switch attempts that held writes).
    pub holds: u64,
    /// Longest time one write waited in a hold, in nanoseconds, failed
    /// attempts included (0 if none was held). Measured by the module: the
    /// figure does not depend on the copier's clock or scheduling.
    pub hold_longest_ns: u64,
    /// Writes that reached the source's head (they are not mirrored: the
    /// switch writes the target's head).
    pub head_writes: u64,
    /// Region holds so far (copies begun with [`REGION_OP_HOLD`]).
    pub region_holds: u64,
    /// Writes that waited in a region hold so far.
    pub region_writes_held: u64,
    /// Longest time one write waited in a region hold, in nanoseconds.
    pub region_hold_longest_ns: u64,
}

/// `RegionOp::result`: done.
pub const REGION_OK: u32 = 0;
/// `RegionOp::result`: a write is in flight; try again later (COPY_BEGIN).
pub const REGION_BUSY: u32 = 1;
/// `RegionOp::result`: the region is already synced.
pub const REGION_SYNCED: u32 = 2;
/// `RegionOp::result`: a write raced the copy; copy again (COPY_END).
pub const REGION_CONFLICT: u32 = 3;
/// `RegionOp::result`: region index past the end of the device.
pub const REGION_RANGE: u32 = 4;
/// `RegionOp::result`: the migration is not in CLONE mode.
pub const REGION_NOT_CLONING: u32 = 5;
/// `RegionOp::result`: the region is not synced (`VerifyBegin`): copy it.
pub const REGION_NOT_SYNCED: u32 = 6;

/// `RegionOp::flags` of [`CtlCmd::CopyBegin`]: hold the region. The module
/// queues every write that touches the region (but the copier's own
/// process's) from this COPY_BEGIN until the region's COPY_END, and waits
/// (at most until the hold's end) for the writes in flight to it to finish
/// before it reads the word. The hold ends at COPY_END (whatever its
/// result: the queued writes are then resubmitted, and mirrored if the
/// region committed), at the attach-time hold timeout after COPY_BEGIN, at
/// a switch's hold (the queued writes join it), and when the migration
/// leaves CLONE or is detached. One region is held at a time: a second
/// hold while one is active is refused with [`REGION_BUSY`]; in a switch's
/// hold the flag is ignored (every write is held already). Writes to other
/// regions are never delayed by it.
pub const REGION_OP_HOLD: u32 = 1 << 0;

/// One element of the arrays of [`CtlCmd::CopyBegin`] and [`CtlCmd::CopyEnd`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RegionOp {
    /// Region index.
    pub region: u64,
    /// COPY_BEGIN out / COPY_END in: the region's word at copy begin.
    pub word: u64,
    /// Out: a `REGION_*` result.
    pub result: u32,
    /// In: `REGION_OP_*` bits: [`REGION_OP_HOLD`] with
    /// [`CtlCmd::CopyBegin`] (and, ignored, with [`CtlCmd::CopyEnd`], which
    /// takes the same array back); zero otherwise.
    pub flags: u32,
}

/// Most [`RegionOp`]s one CTL call may carry.
pub const REGION_OPS_MAX: u32 = 1024;

/// Payload of [`CtlCmd::HoldWrites`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HoldRequest {
    /// Release automatically after this many ms; 0: the attach-time setting.
    pub timeout_ms: u32,
    /// Reserved, zero.
    pub reserved: u32,
}

/// Head of the [`CtlCmd::SyncedMap`] buffer; a bitmap follows, bit `i` of
/// byte `i / 8` for region `first + i`, `count` bits long.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SyncedQuery {
    /// First region.
    pub first: u64,
    /// In: regions asked for. Out: regions answered (less at the end).
    pub count: u64,
}

/// Bytes of the source's *head*, which the retire marker overwrites: the
/// signatures blkid probes at the start of a device lie within it (MBR and
/// the primary GPT in the first 17 KiB, ext4's superblock at 1 KiB, xfs's
/// at 0, an LVM label in the first four sectors, md 1.1 at 0 and 1.2 at
/// 4 KiB, iso9660 at 32 KiB, btrfs at 64 KiB). No larger: the switch reads
/// it and writes it twice with writes held. The
/// head is the first `min(RETIRE_BYTES, device size)` bytes, over as many
/// regions as it takes ([`crate::region::Geometry::head_bytes`]). The copier
/// never writes the target's head and the module never mirrors to it: the
/// switch writes it, after the marker, so that the two devices are never
/// both recognisable. A comparison of a region leaves its head part out.
pub const RETIRE_BYTES: u64 = 128 << 10;

/// The retire marker written over the source's head at the switch.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetireMarker {
    /// [`RETIRE_MAGIC`].
    pub magic: [u8; 16],
    /// [`ABI_VERSION`].
    pub version: u32,
    /// Target device number at the time of the switch.
    pub target_major: u32,
    /// Target device number at the time of the switch.
    pub target_minor: u32,
    /// Reserved, zero.
    pub reserved: u32,
    /// Switch time, seconds since the epoch (CLOCK_REALTIME).
    pub switched_at: u64,
    /// Size of the target in sectors.
    pub target_sectors: u64,
    /// [`Status::migration_id`] of the attachment that switched.
    pub migration_id: u64,
    /// Bytes of the head the marker replaced (saved by `migrate`).
    pub head_bytes: u64,
}

/// First bytes of a retired source.
pub const RETIRE_MAGIC: [u8; 16] = *b"BLKMIG-RETIRED\0\0";

macro_rules! assert_layout {
    ($t:ty, $size:expr, $($field:ident @ $off:expr),*) => {
        const _: () = assert!(core::mem::size_of::<$t>() == $size);
        $(const _: () = assert!(core::mem::offset_of!($t, $field) == $off);)*
    };
}

assert_layout!(BlkfilterAttach, 48, name @ 0, opt @ 32, optlen @ 40, reserved @ 44);
assert_layout!(BlkfilterDetach, 32, name @ 0);
assert_layout!(BlkfilterCtl, 48, name @ 0, cmd @ 32, optlen @ 36, opt @ 40);
assert_layout!(AttachOptions, 24, version @ 0, region_shift @ 4, target_major @ 8,
    target_minor @ 12, hold_timeout_ms @ 16, flags @ 20);
assert_layout!(Status, 168, version @ 0, mode @ 4, region_shift @ 8, flags @ 12,
    source_sectors @ 16, target_sectors @ 24, regions_total @ 32, regions_synced @ 40,
    copy_conflicts @ 48, copy_busy @ 56, writes_seen @ 64, writes_mirrored @ 72,
    writes_held @ 80, bios_redirected @ 88, failure @ 96, failure_errno @ 100,
    target_major @ 104, target_minor @ 108, migration_id @ 112, holds @ 120,
    hold_longest_ns @ 128, head_writes @ 136, region_holds @ 144,
    region_writes_held @ 152, region_hold_longest_ns @ 160);
assert_layout!(RegionOp, 24, region @ 0, word @ 8, result @ 16, flags @ 20);
assert_layout!(HoldRequest, 8, timeout_ms @ 0, reserved @ 4);
assert_layout!(SyncedQuery, 16, first @ 0, count @ 8);
assert_layout!(RetireMarker, 64, magic @ 0, version @ 16, target_major @ 20,
    target_minor @ 24, reserved @ 28, switched_at @ 32, target_sectors @ 40,
    migration_id @ 48, head_bytes @ 56);
