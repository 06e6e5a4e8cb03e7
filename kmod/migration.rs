// SPDX-License-Identifier: GPL-2.0-only
//! The `blkmig` filter: one migration of a source device to a target.
//!
//! CLONE: reads pass to the source (reads of the first region are tracked
//! for the switch); every write is accounted in the region map (epoch and
//! in-flight count of each region it touches) and sent to the source as a
//! clone; a write touching a SYNCED region is also mirrored to the target,
//! unless it touches the head (the first `Geometry::head_bytes`): the
//! target's head is written only by the switch, so its regions are unsynced
//! and copied again instead. The original completes when all its clones have, with the source's
//! status. The copier drives COPY_BEGIN/COPY_END.
//!
//! Hold: HOLD_WRITES queues every new write (but the copier's own) in the
//! module; nothing sleeps in the submitter's context and nothing pins the
//! source's queue. A kernel timer ends the hold at its deadline and
//! resubmits the held writes from the module's workqueue.
//!
//! Region hold: a COPY_BEGIN with `REGION_OP_HOLD` queues the writes to
//! that one region (but the copier's own) until its COPY_END, which
//! resubmits them after the commit, so that they are mirrored; writes to
//! other regions pass (a bio that also touches the held region is held
//! whole; a `REQ_NOWAIT` one is completed with `BLK_STS_AGAIN`). A kernel
//! timer ends it at the hold timeout or 1 s, whichever is shorter; a
//! failure, a detach or a switch's hold (which takes its writes over) end
//! it too, and so does any COPY_END of the region, whatever its result.
//!
//! Switch (SWITCH, inside a hold): every write drained and every region
//! synced, the mode becomes SWITCHING (every write queued, reads to the
//! target), the last in-flight I/O drains, the checks are made again, the
//! target is flushed, the source's head is read and saved, the retire
//! marker is written over it (FUA, then a flush of the source), the saved
//! head is written to the target (FUA), and the mode becomes REDIRECT, where
//! every bio goes to the target. At no instant do both devices hold the
//! head. Every wait is bounded by the hold's deadline (the marker and head
//! writes by a fixed budget past it).

use core::{
    mem::{offset_of, size_of},
    ptr,
    sync::atomic::{AtomicBool, AtomicI32, AtomicU32},
};

use kernel::{
    alloc::flags,
    bindings, c_str, new_spinlock,
    page::{Page, PAGE_SIZE},
    prelude::*,
    sync::SpinLock,
    time::Ktime,
    types::{AsBytes, FromBytes},
    uaccess::UserSlice,
};

use crate::{
    abi::{
        self, AttachOptions, CtlCmd, Failure, HoldRequest, Mode, RegionOp, RetireMarker, Status,
        SyncedQuery,
    },
    bdev::{BlockDevice, DevT, OpenDevice},
    bio::{self, Bio, BioList, BioSet, Kind, Legs, Op, PageBio, SyncIo},
    filter::{Filter, Holder},
    region::{Begin, End, Geometry, RegionMap, Regions, Verify, INFLIGHT_MASK, SYNCED},
    sync::{AtomicU64, Ordering},
    sys,
    wait::{DelayedWork, WaitQueue, WorkQueue},
};

// SAFETY: `Status` is `#[repr(C)]`, made of integers only, and has no
// padding (its layout is asserted in `abi.rs`), so every byte is
// initialised.
unsafe impl AsBytes for Status {}
// SAFETY: As for `Status`: `#[repr(C)]` integers without padding.
unsafe impl AsBytes for RegionOp {}
// SAFETY: Any bit pattern is a valid `RegionOp` (integers only).
unsafe impl FromBytes for RegionOp {}
// SAFETY: Any bit pattern is a valid `HoldRequest` (integers only).
unsafe impl FromBytes for HoldRequest {}
// SAFETY: Any bit pattern is a valid `SyncedQuery` (integers only).
unsafe impl FromBytes for SyncedQuery {}
// SAFETY: `#[repr(C)]` integers without padding.
unsafe impl AsBytes for SyncedQuery {}

/// Internal mode between CLONE and REDIRECT: writes held, reads of the first
/// region held, the source being retired. Reported as CLONE (holding).
const MODE_SWITCHING: u32 = 3;
/// SWITCHING, and a failure came in: the switch, which owns the held bios
/// and the source's head, ends in FAILED. Only the switch leaves either.
/// Reported as CLONE (holding).
const MODE_SWITCHING_FAILED: u32 = 4;

/// Whether `mode` is one of the switch's own modes.
const fn in_switch(mode: u32) -> bool {
    mode == MODE_SWITCHING || mode == MODE_SWITCHING_FAILED
}
/// Bios reserved in each bio set (forward progress under memory pressure).
const POOL: u32 = 64;
// The head (`abi::RETIRE_BYTES` at most) is read and written by one bio of
// at most `BIO_MAX_VECS` pages.
const _: () = assert!(abi::RETIRE_BYTES <= 256 * PAGE_SIZE as u64);
/// How long past the hold's deadline the switch waits for the retire
/// marker's write and the source's flush (the one I/O a held writer may
/// wait for beyond the hold timeout).
const MARKER_BUDGET_MS: i64 = 1000;
/// The regions of a bio that is not accounted in the map.
const NO_REGIONS: Regions = Regions { start: 0, end: 0 };
/// At most this many accounted writes in flight: a region's in-flight
/// count (20 bits) can then never carry into its epoch.
const INFLIGHT_MAX: u64 = INFLIGHT_MASK >> 1;
/// How often a detach that waits for I/O to finish says so.
const DRAIN_REPORT_MS: u64 = 10_000;

fn now_ns() -> i64 {
    Ktime::ktime_get().to_ns()
}

/// Whether `deadline_ns` is more than a tick away. A timer that fires
/// within the last tick before its deadline ends the wait then: armed
/// again, it would fire on the next tick, later past the deadline than it
/// is early now.
fn before_last_tick(deadline_ns: i64) -> bool {
    now_ns().saturating_add(i64::from(bindings::TICK_NSEC)) < deadline_ns
}

/// Milliseconds from now until `deadline_ns` (0 if it has passed).
fn ms_until(deadline_ns: i64) -> u64 {
    let left = deadline_ns - now_ns();
    if left <= 0 {
        0
    } else {
        (left as u64).div_ceil(1_000_000)
    }
}

fn current_tgid() -> i32 {
    kernel::current!().group_leader().pid()
}

fn errno(e: u32) -> Error {
    Error::from_errno(-(e as i32))
}

/// The parsed and checked attach options.
struct Options {
    region_shift: u32,
    target: DevT,
    hold_timeout_ms: u32,
}

impl Options {
    /// Parses `opt` as an [`AttachOptions`].
    fn parse(opt: &[u8]) -> Result<Self> {
        if opt.len() != size_of::<AttachOptions>() {
            return Err(EINVAL);
        }
        // Field by field, at the offsets `abi.rs` asserts: no unsafe
        // reinterpretation of user-controlled bytes.
        let field = |off: usize| -> u32 {
            let mut b = [0u8; 4];
            b.copy_from_slice(&opt[off..off + 4]);
            u32::from_ne_bytes(b)
        };
        let o = AttachOptions {
            version: field(offset_of!(AttachOptions, version)),
            region_shift: field(offset_of!(AttachOptions, region_shift)),
            target_major: field(offset_of!(AttachOptions, target_major)),
            target_minor: field(offset_of!(AttachOptions, target_minor)),
            hold_timeout_ms: field(offset_of!(AttachOptions, hold_timeout_ms)),
            flags: field(offset_of!(AttachOptions, flags)),
        };
        if o.version != abi::ABI_VERSION
            || o.flags != 0
            || !(abi::REGION_SHIFT_MIN..=abi::REGION_SHIFT_MAX).contains(&o.region_shift)
            || o.hold_timeout_ms > abi::HOLD_TIMEOUT_MS_MAX
        {
            return Err(EINVAL);
        }
        Ok(Self {
            region_shift: o.region_shift,
            target: DevT::new(o.target_major, o.target_minor).ok_or(EINVAL)?,
            hold_timeout_ms: match o.hold_timeout_ms {
                0 => abi::HOLD_TIMEOUT_MS_DEFAULT,
                ms => ms,
            },
        })
    }
}

/// `n` region words, all with the same random epoch and nothing in flight
/// or synced. The random start is the attachment's generation: a word a
/// copier obtained under an earlier attachment (of this or another
/// migration) does not match, so its COPY_END cannot commit.
fn alloc_words(n: u64) -> Result<KVVec<AtomicU64>> {
    let n = usize::try_from(n).map_err(|_| E2BIG)?;
    let base = sys::random_u64() & !(INFLIGHT_MASK | SYNCED);
    let mut words = KVVec::with_capacity(n, flags::GFP_KERNEL)?;
    for _ in 0..n {
        // Cannot allocate: the capacity is reserved above.
        words.push(AtomicU64::new(base), flags::GFP_KERNEL)?;
    }
    Ok(words)
}

/// Event counters, reported by [`CtlCmd::Status`].
#[derive(Default)]
struct Counters {
    writes_seen: AtomicU64,
    writes_mirrored: AtomicU64,
    bios_redirected: AtomicU64,
    copy_conflicts: AtomicU64,
    copy_busy: AtomicU64,
}

/// How the write of the target's head in the switch ended.
enum TargetHeadEnd {
    /// On the target, durably.
    Written,
    /// Never submitted: the target is as it was.
    NotWritten(Error),
    /// Failed or still in flight (the migration fails); positive errno.
    Failed(i32),
}

/// What a bio over the head carries.
#[derive(Clone, Copy)]
enum Head {
    /// `head_pages`: the source's head as the switch read it.
    Saved,
    /// The retire marker, then zeros.
    Marker,
    /// Zeros.
    Zeros,
}

/// Where a write lies against the head.
#[derive(Clone, Copy, PartialEq, Eq)]
enum HeadOverlap {
    Outside,
    Within,
    Across,
}

/// `RegionHold::region` when no region is held.
const NO_REGION: u64 = u64::MAX;

/// The longest a region hold lasts, in ms, whatever the attach-time hold
/// timeout: it delays the writes to one region while one copy of it runs
/// (a few ms for a 1 MiB region), and a copier that stalls must not stall
/// them longer than this.
const REGION_HOLD_MS_MAX: u32 = 1000;

/// The region hold (COPY_BEGIN with `REGION_OP_HOLD`): one region, the
/// writes to it queued until its COPY_END or `deadline_ns`.
struct RegionHold {
    /// The held region, or [`NO_REGION`].
    region: u64,
    deadline_ns: i64,
    held: BioList,
    /// When the first bio of `held` was queued (0 if none is).
    first_held_ns: i64,
}

/// The write hold: its deadline and the writes it keeps; and the region
/// hold, under the same lock.
struct Hold {
    deadline_ns: i64,
    held: BioList,
    /// When the first bio of `held` was queued (0 if none is).
    first_held_ns: i64,
    region: RegionHold,
}

/// One attached migration.
///
/// # Invariants
///
/// - `in_switch(mode)` implies `holding`: the switch enters and
///   leaves SWITCHING with `holding` set, and every change of either is
///   made under the `hold` lock.
/// - `owned` counts the bios the filter took (held or sent out) and has not
///   finished; the object outlives them (see `PinnedDrop`).
/// - Only the switch leaves SWITCHING and SWITCHING_FAILED; a failure
///   meanwhile turns the first into the second (compare-and-swap, against
///   the switch's own to REDIRECT), and the switch ends in FAILED.
/// - `held_region` equals `hold.region.region` and changes only under the
///   `hold` lock; a region hold never coexists with `holding` (a hold
///   takes its writes over, and none starts while `holding`).
#[pin_data(PinnedDrop)]
pub(crate) struct Migration {
    /// First field: closed first when the object is dropped, so that the
    /// target's holder callback never sees a half-dropped object.
    target: OpenDevice,
    geometry: Geometry,
    words: KVVec<AtomicU64>,
    /// The filtered device (valid until detach has returned).
    source: *mut bindings::block_device,
    hold_timeout_ms: u32,
    mode: AtomicU32,
    failure: AtomicU32,
    failure_errno: AtomicI32,
    /// The failure that made SWITCHING into SWITCHING_FAILED, recorded when
    /// the switch ends in FAILED.
    pending_failure: AtomicU32,
    pending_errno: AtomicI32,
    /// The source's head could be neither confirmed retired nor put back
    /// after a failed switch: every bio fails rather than reach it.
    fenced: AtomicBool,
    /// A bio crossed the source's edge in REDIRECT (said once).
    edge_warned: AtomicBool,
    /// The target went away (its holder callback ran).
    target_gone: AtomicBool,
    holding: AtomicBool,
    hold_owner: AtomicI32,
    #[pin]
    hold: SpinLock<Hold>,
    /// A HOLD_WRITES, SWITCH or RELEASE command is running.
    ctl_busy: AtomicBool,
    /// Writes accounted in the map and not yet completed.
    inflight_writes: AtomicU64,
    /// Writes held now.
    held_count: AtomicU64,
    /// The region of the region hold, or [`NO_REGION`] (read without the
    /// lock by the write path).
    held_region: AtomicU64,
    /// The process that began the region hold: its own writes pass.
    region_owner: AtomicI32,
    /// A detach has begun: no region hold starts, the one there ends.
    detaching: AtomicBool,
    /// Region holds so far.
    region_holds: AtomicU64,
    /// Writes that waited in a region hold so far.
    region_writes_held: AtomicU64,
    /// Longest time one bio waited in a region hold, in nanoseconds.
    region_hold_longest_ns: AtomicU64,
    /// Reads of the first region sent to the source, not yet completed.
    head_reads: AtomicU64,
    /// Bios the filter took and has not finished.
    owned: AtomicU64,
    stats: Counters,
    /// This attachment's identity, written into the retire marker.
    migration_id: u64,
    /// Holds so far.
    holds: AtomicU64,
    /// Longest time one bio waited in a hold, in nanoseconds.
    hold_longest_ns: AtomicU64,
    /// Writes to the source's head so far (the copier saves the head, and
    /// the switch goes ahead only if this has not moved since).
    head_writes: AtomicU64,
    retire_failed: AtomicBool,
    /// The target's head may hold part of the source's after a failed
    /// switch (its write failed or did not finish, and zeros could not be
    /// written over it).
    target_head_dirty: AtomicBool,
    marker_page: Page,
    zero_page: Page,
    /// The source's first head (`Geometry::head_bytes`), read inside the switch before the
    /// marker overwrites them (written back if the marker write fails).
    head_pages: KVec<Page>,
    /// Woken when a count the switch or detach waits for drops to zero.
    #[pin]
    events: WaitQueue,
    /// The switch's own I/O on the source (flushes, head read, marker) and
    /// on the target (its flush, its head): one slot each, so that an I/O
    /// stuck on one device never keeps the switch from the other. Both wake
    /// `events`.
    sync: SyncIo,
    tsync: SyncIo,
    /// Ends the hold at its deadline; releases held writes after a failure.
    #[pin]
    hold_work: DelayedWork,
    /// Ends the region hold at its deadline, after a failure, at detach.
    #[pin]
    region_work: DelayedWork,
    /// Submits the switch's own I/O (see `SyncIo`), on `io_wq`.
    #[pin]
    submit_work: DelayedWork,
    /// Submits `tsync`'s I/O, on `tio_wq`.
    #[pin]
    tsubmit_work: DelayedWork,
    wq: WorkQueue,
    /// A workqueue (with its own rescuer, high priority and unbound, as
    /// `wq`) for `submit_work` alone: a submission that blocks never
    /// delays the hold's timer.
    io_wq: WorkQueue,
    /// The same for `tsubmit_work`: a source submission that blocks never
    /// delays the target's.
    tio_wq: WorkQueue,
    #[pin]
    ctx_set: BioSet,
    #[pin]
    plain_set: BioSet,
    #[pin]
    io_set: BioSet,
}

// SAFETY: `source` is only used through `&BlockDevice` for the filtered
// device, which the filter core keeps alive while the filter is attached;
// everything else is atomics, a spinlock, owned allocations, or kernel
// objects (bio sets, wait queue, work) that any thread may use.
unsafe impl Send for Migration {}
// SAFETY: See `Send`; all shared state is atomic or under the spinlock.
unsafe impl Sync for Migration {}

/// Marks the running hold/switch command; cleared on drop.
struct CtlGuard<'a>(&'a AtomicBool);

impl Drop for CtlGuard<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// How one I/O of the switch ended.
enum IoEnd {
    /// It could not be made or queued: it never happened.
    NotStarted(Error),
    /// It completed, with this result.
    Done(Result),
    /// The deadline passed before the worker submitted it: it never will.
    Cancelled,
    /// The deadline passed after it was submitted: it may still land.
    Stuck,
}

impl IoEnd {
    /// The errno a switch cancelled by this I/O returns.
    fn errno(self) -> Error {
        match self {
            IoEnd::Done(Err(e)) | IoEnd::NotStarted(e) => e,
            IoEnd::Done(Ok(())) => EIO,
            IoEnd::Cancelled | IoEnd::Stuck => errno(bindings::ETIMEDOUT),
        }
    }
}

impl Migration {
    fn map(&self) -> RegionMap<'_> {
        RegionMap::new(&self.words)
    }

    fn source(&self) -> &BlockDevice {
        // SAFETY: The filter core keeps `flt->bdev` valid until detach has
        // returned, and `self` does not outlive detach.
        unsafe { BlockDevice::from_raw(self.source) }
    }

    fn mode_raw(&self) -> u32 {
        self.mode.load(Ordering::SeqCst)
    }

    fn failed(&self) -> bool {
        self.mode_raw() == Mode::Failed as u32
    }

    /// The reply to [`CtlCmd::Status`].
    fn status(&self) -> Status {
        let target = self.target.bdev();
        let dev = target.dev();
        let raw = self.mode_raw();
        let mode = if in_switch(raw) {
            Mode::Clone as u32
        } else {
            raw
        };
        let mut flags = 0;
        if self.holding.load(Ordering::SeqCst) {
            flags |= abi::STATUS_HOLDING;
        }
        if self.retire_failed.load(Ordering::Relaxed) {
            flags |= abi::STATUS_RETIRE_FAILED;
        }
        if self.target_head_dirty.load(Ordering::Relaxed) {
            flags |= abi::STATUS_TARGET_HEAD_DIRTY;
        }
        Status {
            version: abi::ABI_VERSION,
            mode,
            region_shift: self.geometry.shift(),
            flags,
            source_sectors: self.geometry.sectors(),
            target_sectors: target.nr_sectors(),
            regions_total: self.geometry.regions(),
            regions_synced: self.map().synced_count(),
            copy_conflicts: self.stats.copy_conflicts.load(Ordering::Relaxed),
            copy_busy: self.stats.copy_busy.load(Ordering::Relaxed),
            writes_seen: self.stats.writes_seen.load(Ordering::Relaxed),
            writes_mirrored: self.stats.writes_mirrored.load(Ordering::Relaxed),
            writes_held: self.held_count.load(Ordering::Relaxed),
            bios_redirected: self.stats.bios_redirected.load(Ordering::Relaxed),
            failure: self.failure.load(Ordering::Relaxed),
            failure_errno: self.failure_errno.load(Ordering::Relaxed),
            target_major: dev.major(),
            target_minor: dev.minor(),
            migration_id: self.migration_id,
            holds: self.holds.load(Ordering::Relaxed),
            hold_longest_ns: self.hold_longest_ns.load(Ordering::Relaxed),
            head_writes: self.head_writes.load(Ordering::SeqCst),
            region_holds: self.region_holds.load(Ordering::Relaxed),
            region_writes_held: self.region_writes_held.load(Ordering::Relaxed),
            region_hold_longest_ns: self.region_hold_longest_ns.load(Ordering::Relaxed),
        }
    }

    /// Drops one count of `counter` and wakes the waiters if it reached 0.
    /// Inside an RCU read-side section: once `owned` is 0 the object may be
    /// dropped, and its drop waits for a grace period before it frees the
    /// wait queue this still wakes.
    fn count_down(&self, counter: &AtomicU64) {
        let _rcu = sys::rcu_read_lock();
        if counter.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.events.wake_all();
        }
    }

    /// A write accounted with `write_submit` has completed on every leg;
    /// `status` is the source's.
    pub(crate) fn write_done(&self, regions: Regions, status: u8) {
        if regions.start < self.head_regions() {
            // Counted at completion too: a head write submitted before the
            // copier read the count and finished after it read the head
            // still moves it.
            self.head_writes.fetch_add(1, Ordering::SeqCst);
        }
        if status != 0 {
            // The source did not take the write, the target may have: the
            // regions no longer hold the same bytes on both. Unsync them
            // while the write still counts as in flight, so that no copier
            // can commit in between.
            for r in regions.start..regions.end {
                self.map().unsync(r);
            }
        }
        self.map().write_complete(regions);
        // Pairs with the region hold's COPY_BEGIN, which publishes the
        // held region and then loads the word: either it sees this write
        // completed, or this sees the region held and wakes it.
        core::sync::atomic::fence(core::sync::atomic::Ordering::SeqCst);
        if (regions.start..regions.end).contains(&self.held_region.load(Ordering::SeqCst)) {
            // A region hold's COPY_BEGIN may be waiting for this write.
            self.events.wake_all();
        }
        self.count_down(&self.inflight_writes);
    }

    /// A tracked read of the first region has completed.
    pub(crate) fn head_read_done(&self) {
        self.count_down(&self.head_reads);
    }

    /// A bio the filter took has been finished. Must be the caller's last
    /// use of `self`: detach waits for this count to reach zero.
    pub(crate) fn bio_done(&self) {
        self.count_down(&self.owned);
    }

    /// The target leg of a mirrored write failed with `status`. Any
    /// context.
    pub(crate) fn target_error(&self, regions: Regions, status: u8, discard: bool) {
        if discard && status == bindings::BLK_STS_NOTSUPP {
            // The target cannot discard: the regions no longer track the
            // source and are copied again.
            for r in regions.start..regions.end {
                self.map().unsync(r);
            }
            return;
        }
        self.fail(Failure::TargetWrite, -bio::status_errno(status));
    }

    /// Stops the migration: mirroring ends, every bio passes to the source,
    /// which stays authoritative. Never overrides REDIRECT or an earlier
    /// failure. Any context: held writes are released from the workqueue;
    /// in SWITCHING the switch finishes the job (it owns the held bios and
    /// may have the source's head to put back).
    fn fail(&self, why: Failure, errno: i32) {
        loop {
            let mode = self.mode_raw();
            let next = match mode {
                m if m == Mode::Clone as u32 => Mode::Failed as u32,
                MODE_SWITCHING => {
                    self.pending_failure.store(why as u32, Ordering::SeqCst);
                    self.pending_errno.store(errno, Ordering::SeqCst);
                    MODE_SWITCHING_FAILED
                }
                _ => return,
            };
            if self
                .mode
                .compare_exchange(mode, next, Ordering::SeqCst, Ordering::SeqCst)
                .is_err()
            {
                continue;
            }
            if next == Mode::Failed as u32 {
                self.record_failure(why, errno);
                if self.holding.load(Ordering::SeqCst) {
                    self.hold_work.schedule(&self.wq, 0);
                }
                if self.held_region.load(Ordering::SeqCst) != NO_REGION {
                    self.region_work.schedule(&self.wq, 0);
                }
            }
            self.events.wake_all();
            return;
        }
    }

    fn record_failure(&self, why: Failure, errno: i32) {
        if self
            .failure
            .compare_exchange(
                Failure::None as u32,
                why as u32,
                Ordering::SeqCst,
                Ordering::SeqCst,
            )
            .is_ok()
        {
            self.failure_errno.store(errno, Ordering::Relaxed);
            pr_err!(
                "migration failed (reason {}, errno {}): mirroring stopped, the source stays authoritative\n",
                why as u32,
                errno
            );
        }
    }

    /// Whether the source no longer has the size it had at attach (the map
    /// covers that size only).
    fn resized(&self) -> bool {
        self.source().nr_sectors() != self.geometry.sectors()
    }

    /// Failed, or failing inside the switch.
    fn failing(&self) -> bool {
        let mode = self.mode_raw();
        mode == Mode::Failed as u32 || mode == MODE_SWITCHING_FAILED
    }

    // --- the data path ----------------------------------------------------

    /// Where a bio goes, by mode. Returns the bio if it passes to the
    /// device it was submitted to.
    fn route(&self, bio: Bio) -> Option<Bio> {
        match self.mode_raw() {
            _ if self.fenced.load(Ordering::SeqCst) => {
                bio.end(bindings::BLK_STS_IOERR);
                None
            }
            m if m == Mode::Failed as u32 => Some(bio),
            m if m == Mode::Redirect as u32 => self.redirect(bio),
            m if in_switch(m) => match bio.op() {
                // The source still holds every byte outside its head, and
                // no write changes it: reads go on there; reads of the head
                // wait while it is retired.
                Op::Read if !self.touches_head(&bio) => Some(bio),
                _ => self.hold_bio(bio),
            },
            _ => match bio.op() {
                Op::Read => self.clone_read(bio),
                // Zone operations: zoned devices are refused at attach.
                Op::Other => Some(bio),
                Op::Write | Op::Discard | Op::WriteZeroes => self.clone_write(bio),
            },
        }
    }

    /// The bio's sectors as `(offset in the source, length)`, if they lie
    /// within the source as it was at attach.
    fn span(&self, bio: &Bio) -> Option<(u64, u64)> {
        let start = bio.disk_sector().checked_sub(self.source().start_sect())?;
        let len = bio.nr_sectors();
        (start.checked_add(len)? <= self.geometry.sectors()).then_some((start, len))
    }

    /// Whether `bio` reaches the source's head (or cannot be placed in the
    /// source).
    fn touches_head(&self, bio: &Bio) -> bool {
        match self.span(bio) {
            Some((start, len)) => self.geometry.touches_head(start, len),
            None => !bio.is_for(self.source()) || bio.nr_sectors() == 0,
        }
    }

    /// Where the write `bio` (within the source) lies against the head.
    fn head_overlap(&self, bio: &Bio) -> HeadOverlap {
        match self.span(bio) {
            Some((start, len)) if self.geometry.within_head(start, len) => HeadOverlap::Within,
            Some((start, len)) if self.geometry.touches_head(start, len) => HeadOverlap::Across,
            _ => HeadOverlap::Outside,
        }
    }

    /// Sends clones of `bio` to `legs` from the migration's bio sets (see
    /// [`bio::send`]).
    fn send(
        &self,
        bio: Bio,
        kind: Kind,
        regions: Regions,
        legs: Legs<'_>,
    ) -> core::result::Result<(), Bio> {
        bio::send(
            self,
            &self.ctx_set,
            &self.plain_set,
            bio,
            kind,
            regions,
            legs,
        )
    }

    /// Queues `bio` while writes are held. Returns it routed anew if the
    /// hold has ended meanwhile.
    fn hold_bio(&self, bio: Bio) -> Option<Bio> {
        let mut h = self.hold.lock();
        if !self.holding.load(Ordering::SeqCst) {
            drop(h);
            return self.route(bio);
        }
        self.owned.fetch_add(1, Ordering::SeqCst);
        self.held_count.fetch_add(1, Ordering::Relaxed);
        if h.first_held_ns == 0 {
            h.first_held_ns = now_ns();
        }
        h.held.push(bio);
        None
    }

    /// Takes the held bios out of `h`, and records how long the first of
    /// them (the one that waited longest) was held.
    fn take_held(&self, h: &mut Hold) -> BioList {
        if h.first_held_ns != 0 {
            let waited = u64::try_from(now_ns() - h.first_held_ns).unwrap_or(0);
            self.hold_longest_ns.fetch_max(waited, Ordering::Relaxed);
            h.first_held_ns = 0;
        }
        h.held.take()
    }

    /// Sends `bio` to the target only.
    fn redirect(&self, bio: Bio) -> Option<Bio> {
        let sector = if bio.nr_sectors() == 0 {
            0
        } else {
            let start = bio.disk_sector().checked_sub(self.source().start_sect());
            let inside = |s: u64| {
                s.checked_add(bio.nr_sectors())
                    .is_some_and(|end| end <= self.source().nr_sectors())
            };
            match start {
                // Everything addressed to the source goes to the target,
                // past the size it had at attach too (a source grown after
                // the switch): the target's own end-of-device check
                // applies.
                Some(s) if bio.is_for(self.source()) || inside(s) => s,
                // Through the whole disk over the partition's edge: part of
                // it is the source's, whose data now lives on the target.
                // Neither device alone can serve it.
                _ => {
                    if !self.edge_warned.swap(true, Ordering::Relaxed) {
                        pr_warn!("an I/O through the whole disk crosses the edge of the migrated partition: failed\n");
                    }
                    bio.end(bindings::BLK_STS_IOERR);
                    return None;
                }
            }
        };
        self.owned.fetch_add(1, Ordering::SeqCst);
        self.stats.bios_redirected.fetch_add(1, Ordering::Relaxed);
        let legs = Legs {
            source: false,
            target: Some((self.target.bdev(), sector)),
        };
        match self.send(bio, Kind::Redirect, NO_REGIONS, legs) {
            Ok(()) => None,
            Err(bio) => {
                bio.end(bindings::BLK_STS_IOERR);
                self.bio_done();
                None
            }
        }
    }

    /// A read in CLONE: passes, but for reads of the first region, which
    /// are sent to the source as tracked clones so that the switch can wait
    /// for them before the marker overwrites that region.
    fn clone_read(&self, bio: Bio) -> Option<Bio> {
        let Some((start, len)) = self.span(&bio) else {
            return Some(bio);
        };
        if !self.geometry.touches_head(start, len) {
            return Some(bio);
        }
        // Count first, then look at the mode: pairs with the switch, which
        // sets SWITCHING first and then waits for this count.
        self.head_reads.fetch_add(1, Ordering::SeqCst);
        if self.mode_raw() != Mode::Clone as u32 {
            self.head_read_done();
            return self.route(bio);
        }
        self.owned.fetch_add(1, Ordering::SeqCst);
        let legs = Legs {
            source: true,
            target: None,
        };
        match self.send(bio, Kind::HeadRead, NO_REGIONS, legs) {
            Ok(()) => None,
            Err(bio) => {
                self.head_read_done();
                self.bio_done();
                Some(bio)
            }
        }
    }

    /// Drops a write's count in `inflight_writes` that never reached the
    /// map.
    fn write_unaccount(&self) {
        self.count_down(&self.inflight_writes);
    }

    /// The regions a write touches, or `None` if it must pass untracked,
    /// which fails the migration unless the write cannot change the
    /// source's data as it was at attach.
    fn write_regions(&self, bio: &Bio) -> Option<Regions> {
        if let Some((start, len)) = self.span(bio) {
            return Some(self.geometry.regions_of(start, len));
        }
        if self.resized() {
            // Past the end the map covers: the source has grown.
            self.fail(Failure::SourceResized, bindings::EINVAL as i32);
        } else if !bio.is_for(self.source()) {
            // Through the whole disk or another partition, over the edge of
            // the source: part of it could not be mirrored.
            self.fail(Failure::PartialWrite, bindings::EINVAL as i32);
        }
        // Else past the end of the device: the block layer fails it.
        None
    }

    /// A write in CLONE: accounted, held, mirrored or passed. Loops while
    /// a region hold that has just ended hands the write back (a new hold
    /// of its region can begin meanwhile): a loop rather than a recursion.
    fn clone_write(&self, mut bio: Bio) -> Option<Bio> {
        loop {
            match self.clone_write_once(bio) {
                Ok(done) => return done,
                Err(back) => bio = back,
            }
        }
    }

    /// One attempt of [`Migration::clone_write`]; `Err` hands the bio back
    /// to try again.
    fn clone_write_once(&self, bio: Bio) -> core::result::Result<Option<Bio>, Bio> {
        if bio.nr_sectors() == 0 {
            // An empty flush: the source is authoritative, nothing to track.
            return Ok(Some(bio));
        }
        // Account first, then look at the hold: pairs with `hold_writes`,
        // whose drain then either sees this write or this write sees the
        // hold.
        let n = self.inflight_writes.fetch_add(1, Ordering::SeqCst);
        let held = self.holding.load(Ordering::SeqCst)
            && (in_switch(self.mode_raw())
                || current_tgid() != self.hold_owner.load(Ordering::SeqCst));
        if held || self.mode_raw() != Mode::Clone as u32 {
            self.write_unaccount();
            return Ok(if held {
                self.hold_bio(bio)
            } else {
                self.route(bio)
            });
        }
        if n >= INFLIGHT_MAX {
            self.write_unaccount();
            self.fail(Failure::TooManyWrites, bindings::EOVERFLOW as i32);
            return Ok(Some(bio));
        }
        let Some(regions) = self.write_regions(&bio) else {
            self.write_unaccount();
            return Ok(Some(bio));
        };
        if (regions.start..regions.end).contains(&self.held_region.load(Ordering::SeqCst))
            && current_tgid() != self.region_owner.load(Ordering::SeqCst)
        {
            // Checked after the count, as the hold: a write that missed
            // the region hold moves the region's epoch, and the copy it
            // raced does not commit.
            self.write_unaccount();
            return self.region_hold_bio(bio, regions).map(|()| None);
        }
        let mut mirror = self.map().write_submit(regions);
        // The target's head is the switch's to write, after the retire
        // marker (which reads the source's head then): until then the
        // target must not look like the filesystem. A write within the head
        // needs nothing more; one that reaches past it sends its regions
        // back to be copied (it counts as in flight, so no copier commits in
        // between). Either way the copier learns that the head changed.
        match self.head_overlap(&bio) {
            HeadOverlap::Outside => {}
            overlap => {
                self.head_writes.fetch_add(1, Ordering::SeqCst);
                if overlap == HeadOverlap::Across {
                    // Only the regions with bytes past the head: the head
                    // part is the switch's, whatever the write does to it.
                    for r in regions.start.max(self.head_full_regions())..regions.end {
                        self.map().unsync(r);
                    }
                }
                mirror = false;
            }
        }
        self.stats.writes_seen.fetch_add(1, Ordering::Relaxed);
        self.owned.fetch_add(1, Ordering::SeqCst);
        let target = if mirror {
            self.stats.writes_mirrored.fetch_add(1, Ordering::Relaxed);
            // `write_regions` checked the span.
            let start = bio.disk_sector() - self.source().start_sect();
            Some((self.target.bdev(), start))
        } else {
            None
        };
        let legs = Legs {
            source: true,
            target,
        };
        Ok(match self.send(bio, Kind::Write, regions, legs) {
            Ok(()) => None,
            Err(bio) => {
                // Not sent: stop the migration before the write lands
                // untracked, then undo the accounting (FAILED ignores the
                // map).
                self.fail(Failure::NoMemory, bindings::ENOMEM as i32);
                self.map().write_complete(regions);
                self.write_unaccount();
                self.bio_done();
                Some(bio)
            }
        })
    }

    // --- the hold -----------------------------------------------------------

    /// Ends the hold and resubmits every held write. Process context.
    fn release(&self) {
        let held = {
            let mut h = self.hold.lock();
            self.holding.store(false, Ordering::SeqCst);
            self.take_held(&mut h)
        };
        self.dispatch(held);
    }

    /// Routes held bios anew (process context).
    fn dispatch(&self, mut held: BioList) {
        while let Some(bio) = held.pop() {
            self.held_count.fetch_sub(1, Ordering::Relaxed);
            if let Some(bio) = self.route(bio) {
                bio.submit();
            }
            // The hold's count, dropped after the bio found its way.
            self.bio_done();
        }
    }

    /// The hold's timer: at the deadline, a hold the switch has not taken
    /// over ends; after a failure, held writes go to the source.
    fn hold_expired(&self) {
        let mut timed_out = None;
        let held = {
            let mut h = self.hold.lock();
            let mode = self.mode_raw();
            if !self.holding.load(Ordering::SeqCst) || in_switch(mode) {
                // The switch bounds its own waits and releases the hold.
                return;
            }
            if mode == Mode::Clone as u32 {
                if before_last_tick(h.deadline_ns) {
                    // Early (the timer is armed short of long deadlines):
                    // wait the rest.
                    let left = u32::try_from(ms_until(h.deadline_ns)).unwrap_or(u32::MAX);
                    drop(h);
                    self.hold_work.schedule(&self.wq, left.max(1));
                    if self.failed() {
                        // A failure's immediate release must not wait for
                        // the re-armed deadline.
                        self.hold_work.schedule(&self.wq, 0);
                    }
                    return;
                }
                timed_out = Some(now_ns().saturating_sub(h.deadline_ns).max(0) / 1000);
            }
            self.holding.store(false, Ordering::SeqCst);
            self.take_held(&mut h)
        };
        self.dispatch(held);
        // Said once the writes are on their way: a console write is slow.
        if let Some(late_us) = timed_out {
            pr_warn!(
                "write hold timed out ({} us past its deadline): writes released, switch cancelled\n",
                late_us
            );
        }
    }

    fn hold_writes(&self, buf: UserSlice, len: u32) -> Result {
        if self.mode_raw() != Mode::Clone as u32 {
            return Err(EINVAL);
        }
        if (len as usize) < size_of::<HoldRequest>() {
            return Err(EINVAL);
        }
        let req: HoldRequest = buf.reader().read()?;
        if req.reserved != 0 {
            return Err(EINVAL);
        }
        let ms = match req.timeout_ms {
            0 => self.hold_timeout_ms,
            ms => ms.min(abi::HOLD_TIMEOUT_MS_MAX),
        };
        let deadline = now_ns() + i64::from(ms) * 1_000_000;
        {
            let mut h = self.hold.lock();
            if self.holding.load(Ordering::SeqCst) {
                // One hold, one deadline: a copier cannot extend it.
                return Err(EBUSY);
            }
            self.hold_owner.store(current_tgid(), Ordering::SeqCst);
            h.deadline_ns = deadline;
            self.holding.store(true, Ordering::SeqCst);
            self.holds.fetch_add(1, Ordering::Relaxed);
            self.region_into_hold(&mut h);
        }
        // A COPY_BEGIN waiting in the region hold that just ended.
        self.events.wake_all();
        self.hold_work.schedule(&self.wq, ms);
        // The writes accounted before the hold (and the copier's own)
        // drain; new ones are queued.
        self.drain_writes(deadline)
    }

    /// Waits until no accounted write is in flight, at most until
    /// `deadline_ns`. If the migration fails or the deadline passes first,
    /// the hold ends (`EIO`, `ETIMEDOUT`).
    fn drain_writes(&self, deadline_ns: i64) -> Result {
        let drained = self.events.wait_until(ms_until(deadline_ns), || {
            self.inflight_writes.load(Ordering::SeqCst) == 0 || self.failed()
        });
        if self.failed() {
            self.release();
            return Err(EIO);
        }
        if !drained {
            self.release();
            return Err(errno(bindings::ETIMEDOUT));
        }
        Ok(())
    }

    // --- the switch ---------------------------------------------------------

    /// Leaves SWITCHING for `to` (CLONE or REDIRECT), or for FAILED if a
    /// failure came in meanwhile, and releases the held bios. Returns
    /// whether the mode is `to` now.
    fn leave_switching(&self, to: Mode) -> bool {
        let (reached, deadline) = self.end_switch_mode(to);
        let late_us = now_ns().saturating_sub(deadline) / 1000;
        self.release();
        if late_us > 0 {
            pr_info!(
                "switch ended: writes released {} us past the hold's deadline\n",
                late_us
            );
        }
        reached
    }

    /// Moves out of SWITCHING to `to`, or out of SWITCHING_FAILED to
    /// FAILED (recording the failure). Returns whether the mode is `to`,
    /// and the deadline of the hold the switch ran in.
    fn end_switch_mode(&self, to: Mode) -> (bool, i64) {
        let h = self.hold.lock();
        let deadline = h.deadline_ns;
        if self
            .mode
            .compare_exchange(
                MODE_SWITCHING,
                to as u32,
                Ordering::SeqCst,
                Ordering::SeqCst,
            )
            .is_ok()
        {
            return (true, deadline);
        }
        if self
            .mode
            .compare_exchange(
                MODE_SWITCHING_FAILED,
                Mode::Failed as u32,
                Ordering::SeqCst,
                Ordering::SeqCst,
            )
            .is_ok()
        {
            let why = Failure::from_raw(self.pending_failure.load(Ordering::SeqCst))
                .unwrap_or(Failure::TargetWrite);
            self.record_failure(why, self.pending_errno.load(Ordering::SeqCst));
        }
        drop(h);
        (false, deadline)
    }
    /// Runs one I/O of the switch (`bio`, if it could be made) through the
    /// worker and waits for it, at most until `deadline_ns`.
    fn sync_run(&self, bio: Result<PageBio>, deadline_ns: i64) -> IoEnd {
        self.run_on(&self.sync, &self.submit_work, &self.io_wq, bio, deadline_ns)
    }

    /// [`Self::sync_run`] on the target's slot.
    fn tsync_run(&self, bio: Result<PageBio>, deadline_ns: i64) -> IoEnd {
        self.run_on(
            &self.tsync,
            &self.tsubmit_work,
            &self.tio_wq,
            bio,
            deadline_ns,
        )
    }

    fn run_on(
        &self,
        io: &SyncIo,
        work: &DelayedWork,
        wq: &WorkQueue,
        bio: Result<PageBio>,
        deadline_ns: i64,
    ) -> IoEnd {
        if let Err(e) = bio.and_then(|bio| io.queue(bio)) {
            return IoEnd::NotStarted(e);
        }
        work.schedule(wq, 0);
        if self.events.wait_until(ms_until(deadline_ns), || io.idle()) {
            return IoEnd::Done(io.result());
        }
        if io.cancel() {
            IoEnd::Cancelled
        } else {
            IoEnd::Stuck
        }
    }

    /// A bio over the source's first head (`Geometry::head_bytes`) (its head): a read
    /// into `head_pages`, or a write of them, or of the retire marker (the
    /// marker page, then zeros).
    fn head_bio(&self, write: bool, marker: bool) -> Result<PageBio> {
        let data = if marker { Head::Marker } else { Head::Saved };
        self.head_bio_on(self.source(), &self.sync, write, data)
    }

    /// A write of the target's head: the saved head, or zeros.
    fn target_head_bio(&self, data: Head) -> Result<PageBio> {
        self.head_bio_on(self.target.bdev(), &self.tsync, true, data)
    }

    /// [`Self::head_bio`] on `bdev`, completed into `io`.
    fn head_bio_on(
        &self,
        bdev: &BlockDevice,
        io: &SyncIo,
        write: bool,
        data: Head,
    ) -> Result<PageBio> {
        let len = self.retire_len();
        let page_at = |i: usize| {
            let l = (len - (i as u64) * PAGE_SIZE as u64).min(PAGE_SIZE as u64) as u32;
            let page = match (data, i) {
                (Head::Marker, 0) => &self.marker_page,
                (Head::Marker, _) | (Head::Zeros, _) => &self.zero_page,
                (Head::Saved, _) => &self.head_pages[i],
            };
            (page, l)
        };
        let opf = if write {
            bindings::req_op_REQ_OP_WRITE | bindings::REQ_SYNC | bindings::REQ_FUA
        } else {
            bindings::req_op_REQ_OP_READ | bindings::REQ_SYNC
        };
        self.io_set
            .page_bio(bdev, 0, opf, self.head_pages.len(), page_at, io)
            .ok_or(ENOMEM)
    }

    /// Bytes of the source's head the marker overwrites.
    fn retire_len(&self) -> u64 {
        self.geometry.head_bytes()
    }

    /// Fills the marker page: magic, the target's identity and size, now.
    fn prepare_marker(&self) -> Result {
        let target = self.target.bdev();
        let marker = RetireMarker {
            magic: abi::RETIRE_MAGIC,
            version: abi::ABI_VERSION,
            target_major: target.dev().major(),
            target_minor: target.dev().minor(),
            reserved: 0,
            switched_at: sys::wall_clock_seconds(),
            target_sectors: target.nr_sectors(),
            migration_id: self.migration_id,
            head_bytes: self.retire_len(),
        };
        // SAFETY: `marker` is valid for its size, which fits in the page;
        // the page is in no bio now (the switch's I/O is idle).
        unsafe {
            self.marker_page.write_raw(
                ptr::from_ref(&marker).cast::<u8>(),
                0,
                size_of::<RetireMarker>(),
            )
        }
    }

    /// `head_writes`: the count of writes to the head the copier saw when
    /// it read and saved the head; if it has moved since, the saved head is
    /// stale and the switch answers `EAGAIN` (still holding, before
    /// SWITCHING).
    fn switch(&self, head_writes: u64) -> Result {
        match self.mode_raw() {
            m if m == Mode::Clone as u32 => {}
            m if m == Mode::Failed as u32 => return Err(EIO),
            _ => return Err(EINVAL),
        }
        if !self.sync.idle() || !self.tsync.idle() {
            // The I/O of an earlier, timed-out attempt is still in flight:
            // no switch now, and no hold that waits for one.
            self.release();
            return Err(EBUSY);
        }
        let deadline = {
            let h = self.hold.lock();
            let deadline = h.deadline_ns;
            let live = self.holding.load(Ordering::SeqCst) && now_ns() < deadline;
            drop(h);
            if !live {
                self.release();
                return Err(errno(bindings::ETIMEDOUT));
            }
            deadline
        };

        // 1. Every accounted write has drained, every region is synced, and
        //    the source has the size it had at attach.
        self.drain_writes(deadline)?;
        if self.resized() {
            self.fail(Failure::SourceResized, bindings::EINVAL as i32);
            self.release();
            return Err(EIO);
        }
        if !self.map().all_synced() || !self.head_unchanged(head_writes) {
            // The copier copies what is left, or saves the head again, and
            // asks again.
            return Err(EAGAIN);
        }
        if let Err(e) = self.prepare_marker() {
            self.release();
            return Err(e);
        }

        // 2. SWITCHING: every write is queued, the copier's too, and so are
        //    reads of the source's head; other reads go on to the source,
        //    which nothing changes now.
        {
            let h = self.hold.lock();
            let live = self.holding.load(Ordering::SeqCst) && now_ns() < deadline;
            let entered = live
                && self
                    .mode
                    .compare_exchange(
                        Mode::Clone as u32,
                        MODE_SWITCHING,
                        Ordering::SeqCst,
                        Ordering::SeqCst,
                    )
                    .is_ok();
            drop(h);
            if !entered {
                self.release();
                return Err(if self.failed() {
                    EIO
                } else {
                    errno(bindings::ETIMEDOUT)
                });
            }
        }
        // The last writes (the copier's) and the tracked reads of the
        // first region drain; then the checks hold for good.
        let drained = self.events.wait_until(ms_until(deadline), || {
            (self.inflight_writes.load(Ordering::SeqCst) == 0
                && self.head_reads.load(Ordering::SeqCst) == 0)
                || self.failing()
        });
        if self.failing() {
            self.leave_switching(Mode::Clone);
            return Err(EIO);
        }
        if !drained {
            self.leave_switching(Mode::Clone);
            return Err(errno(bindings::ETIMEDOUT));
        }
        if !self.map().all_synced() || !self.head_unchanged(head_writes) {
            self.leave_switching(Mode::Clone);
            return Err(EAGAIN);
        }
        if self.target.bdev().read_only() {
            self.fail(Failure::TargetWrite, bindings::EROFS as i32);
            self.leave_switching(Mode::Clone);
            return Err(EIO);
        }

        // 3. The target holds everything durably before the source is
        //    retired. A flush that fails fails the migration; one that does
        //    not finish in time only this attempt.
        let io_start = now_ns();
        let flush = self.tsync.flush_bio(&self.io_set, self.target.bdev());
        match self.tsync_run(flush, deadline) {
            IoEnd::Done(Ok(())) => {}
            IoEnd::Done(Err(e)) => {
                self.fail(Failure::TargetFlush, e.to_errno().abs());
                self.leave_switching(Mode::Clone);
                return Err(EIO);
            }
            IoEnd::NotStarted(e) => {
                self.leave_switching(Mode::Clone);
                return Err(e);
            }
            IoEnd::Cancelled | IoEnd::Stuck => {
                self.leave_switching(Mode::Clone);
                return Err(errno(bindings::ETIMEDOUT));
            }
        }

        // 4. Keep the source's head, then retire it. Until the marker write
        //    is submitted nothing has changed on the source.
        match self.sync_run(self.head_bio(false, false), deadline) {
            IoEnd::Done(Ok(())) => {}
            end => {
                pr_warn!("could not read the source's head before retiring it; switch cancelled\n");
                self.leave_switching(Mode::Clone);
                return Err(end.errno());
            }
        }
        if self.failing() {
            // Nothing has been written to the source yet.
            self.leave_switching(Mode::Clone);
            return Err(EIO);
        }
        // Once the marker is submitted the switch is finished, past the
        // deadline if it must be. What remains, the marker on the source
        // and the head on the target, each a write of the head's size with
        // its flush, costs about the target's flush and the source's read
        // just done, once per device: begun only if that ends by the
        // deadline, so that the hold keeps the copier's budget.
        let now = now_ns();
        if now.saturating_add(now.saturating_sub(io_start).saturating_mul(2)) > deadline {
            pr_info!("switch cancelled: its last writes would end past the deadline\n");
            self.leave_switching(Mode::Clone);
            return Err(errno(bindings::ETIMEDOUT));
        }
        // The target's head bio is made now: nothing after the marker may
        // fail for want of memory.
        let thead = match self.target_head_bio(Head::Saved) {
            Ok(bio) => bio,
            Err(e) => {
                self.leave_switching(Mode::Clone);
                return Err(e);
            }
        };
        let budget = deadline + MARKER_BUDGET_MS * 1_000_000;
        self.retire_source(budget)?;

        // 5. Only now the target gets its head: the source is retired
        //    first, so the two never both hold it (but where the marker
        //    could not be confirmed, `retire_failed`). Written on the
        //    target's own slot and budget: a source I/O still in flight
        //    does not keep it waiting.
        let head_on_target = match self.write_target_head(thead) {
            TargetHeadEnd::Written => true,
            TargetHeadEnd::NotWritten(e) => {
                // Nothing reached the target: the source gets its head
                // back and stays authoritative, still in CLONE; if it
                // cannot, the source is fenced and the migration fails.
                if !self.undo_retire() {
                    self.fail(Failure::TargetWrite, e.to_errno().abs());
                }
                self.leave_switching(Mode::Clone);
                return Err(e);
            }
            TargetHeadEnd::Failed(e) => {
                pr_err!(
                    "could not write the target's head ({}); the source's head goes back\n",
                    e
                );
                self.fail(Failure::TargetWrite, e);
                false
            }
        };

        // 6. REDIRECT, unless the migration failed meanwhile (the target
        //    went away, or its head could not be written): then the
        //    source's head goes back first, while the writes are still
        //    held.
        let switched = {
            let _h = self.hold.lock();
            self.mode
                .compare_exchange(
                    MODE_SWITCHING,
                    Mode::Redirect as u32,
                    Ordering::SeqCst,
                    Ordering::SeqCst,
                )
                .is_ok()
        };
        let late_us = now_ns().saturating_sub(deadline) / 1000;
        if !switched {
            // SWITCHING_FAILED: every bio stays held, and reads of the head
            // wait, until the head is back; then FAILED. A head the target
            // got is blanked first: the source alone looks like the
            // filesystem again.
            if head_on_target {
                self.blank_target_head();
            }
            let _ = self.undo_retire();
            self.leave_switching(Mode::Clone);
            return Err(EIO);
        }
        self.release();
        // The switch's last writes may end past the deadline (the guard
        // before the marker is an estimate): said, so that a pause over
        // the copier's budget can be told from a late timer.
        if late_us > 0 {
            pr_info!(
                "switched: every bio now goes to the target ({} us past the hold's deadline)\n",
                late_us
            );
        } else {
            pr_info!("switched: every bio now goes to the target\n");
        }
        Ok(())
    }

    /// Regions that hold part of the head.
    fn head_regions(&self) -> u64 {
        self.geometry
            .head_bytes()
            .div_ceil(self.geometry.region_bytes())
    }

    /// Regions wholly inside the head.
    fn head_full_regions(&self) -> u64 {
        self.geometry.head_bytes() / self.geometry.region_bytes()
    }

    /// Whether no write reached the head since the copier saw `expected`
    /// writes to it.
    fn head_unchanged(&self, expected: u64) -> bool {
        expected == self.head_writes.load(Ordering::SeqCst)
    }

    /// Writes the saved head to the target (FUA) within a budget of its own;
    /// a write still in flight at its end gets a second one. A write that
    /// failed, maybe in part, is followed by zeros over the target's head,
    /// so that the source, which gets its head back, stays the only device
    /// that looks like the filesystem.
    fn write_target_head(&self, bio: PageBio) -> TargetHeadEnd {
        let budget = now_ns() + MARKER_BUDGET_MS * 1_000_000;
        let failed = |e: i32| {
            self.blank_target_head();
            TargetHeadEnd::Failed(e)
        };
        match self.tsync_run(Ok(bio), budget) {
            IoEnd::Done(Ok(())) => TargetHeadEnd::Written,
            IoEnd::NotStarted(e) => TargetHeadEnd::NotWritten(e),
            IoEnd::Cancelled => TargetHeadEnd::NotWritten(errno(bindings::ETIMEDOUT)),
            IoEnd::Done(Err(e)) => failed(e.to_errno().abs()),
            IoEnd::Stuck => {
                let budget = now_ns() + MARKER_BUDGET_MS * 1_000_000;
                if !self
                    .events
                    .wait_until(ms_until(budget), || self.tsync.idle())
                {
                    // It may land later, next to the source's head put
                    // back: said in the status until the target is wiped.
                    self.target_head_dirty.store(true, Ordering::Relaxed);
                    return TargetHeadEnd::Failed(bindings::ETIMEDOUT as i32);
                }
                match self.tsync.result() {
                    Ok(()) => TargetHeadEnd::Written,
                    Err(e) => failed(e.to_errno().abs()),
                }
            }
        }
    }

    /// Zeros over the target's head after a failed write of it (best
    /// effort, bounded; the status says so if it did not complete).
    fn blank_target_head(&self) {
        let budget = now_ns() + MARKER_BUDGET_MS * 1_000_000;
        if !matches!(
            self.tsync_run(self.target_head_bio(Head::Zeros), budget),
            IoEnd::Done(Ok(()))
        ) {
            self.target_head_dirty.store(true, Ordering::Relaxed);
        }
    }

    /// The switch failed after the retire marker was written (the mode is
    /// still SWITCHING_FAILED, so every bio is held): puts the saved head
    /// back. The switch's I/O in flight (a marker or a flush that did not
    /// finish in time) is waited for first, within its own budget, so that
    /// it cannot land after the head. If the head cannot be put back, the
    /// source is fenced: every bio fails rather than reach a source whose
    /// first region is the marker.
    fn undo_retire(&self) -> bool {
        let budget = now_ns() + MARKER_BUDGET_MS * 1_000_000;
        let idle = self
            .events
            .wait_until(ms_until(budget), || self.sync.idle());
        let budget = now_ns() + MARKER_BUDGET_MS * 1_000_000;
        if idle
            && matches!(
                self.sync_run(self.head_bio(true, false), budget),
                IoEnd::Done(Ok(()))
            )
        {
            return true;
        }
        self.retire_failed.store(true, Ordering::Relaxed);
        // The held bios, and every bio after them, end in error (`route`
        // sees the fence).
        self.fenced.store(true, Ordering::SeqCst);
        pr_err!("the switch failed and the source's head could not be put back: every I/O to the source fails; restore its head from the saved copy\n");
        false
    }

    /// Writes the retire marker over the source's head and flushes the
    /// source, within `budget_ns`. On `Ok` the switch goes on to REDIRECT
    /// (with the `retire_failed` flag if the marker could not be
    /// confirmed); on `Err` the switch was cancelled and the source is as
    /// it was.
    fn retire_source(&self, budget_ns: i64) -> Result {
        match self.sync_run(self.head_bio(true, true), budget_ns) {
            IoEnd::Done(Ok(())) => {}
            IoEnd::NotStarted(e) => {
                // Never submitted: the source is untouched.
                self.leave_switching(Mode::Clone);
                return Err(e);
            }
            IoEnd::Cancelled => {
                // Never submitted: the source is untouched.
                self.leave_switching(Mode::Clone);
                return Err(errno(bindings::ETIMEDOUT));
            }
            IoEnd::Stuck => {
                // Submitted and not finished: it may still land, and going
                // back would let it overwrite the live source. The target
                // holds every byte.
                self.retire_failed.store(true, Ordering::Relaxed);
                pr_err!("the retire marker did not complete in time; switching anyway (the source may still look like the filesystem)\n");
                return Ok(());
            }
            IoEnd::Done(Err(e)) => {
                // Failed, maybe in part: put the saved bytes back, with a
                // budget of its own.
                let budget = now_ns() + MARKER_BUDGET_MS * 1_000_000;
                let restored = self.sync_run(self.head_bio(true, false), budget);
                if matches!(restored, IoEnd::Done(Ok(()))) {
                    pr_warn!("could not write the retire marker ({:?}); switch cancelled, the source stays authoritative\n", e);
                    self.leave_switching(Mode::Clone);
                    return Err(EIO);
                }
                self.retire_failed.store(true, Ordering::Relaxed);
                pr_err!("could not write the retire marker ({:?}) nor put the source's head back; switching to the complete target\n", e);
                return Ok(());
            }
        }
        let flush = self.sync.flush_bio(&self.io_set, self.source());
        if !matches!(self.sync_run(flush, budget_ns), IoEnd::Done(Ok(()))) {
            self.retire_failed.store(true, Ordering::Relaxed);
            pr_err!("could not flush the retire marker; switching anyway\n");
        }
        Ok(())
    }

    // --- the copy protocol --------------------------------------------------

    fn copy(&self, cmd: CtlCmd, buf: UserSlice, len: &mut u32) -> Result {
        let n = *len as usize / size_of::<RegionOp>();
        if *len as usize % size_of::<RegionOp>() != 0 || n > abi::REGION_OPS_MAX as usize {
            return Err(EINVAL);
        }
        let (r, mut w) = buf.reader_writer();
        // Every op is checked before any is acted on: a bad one later in
        // the array must not leave a region hold begun by an earlier one.
        let mut check = r.clone_reader();
        let mut holds = 0;
        for _ in 0..n {
            let op: RegionOp = check.read()?;
            self.check_op(cmd, &op, &mut holds)?;
        }
        let mut r = r;
        // The region this call has begun to hold: an error later in the
        // call ends it (the copier does not learn that it holds it).
        let mut began: Option<u64> = None;
        let res = (|| -> Result {
            let cloning = self.mode_raw() == Mode::Clone as u32;
            // The array is read again: each op is checked again as it is
            // acted on, as the caller may have changed it meanwhile.
            let mut holds = 0;
            for _ in 0..n {
                let mut op: RegionOp = r.read()?;
                self.check_op(cmd, &op, &mut holds)?;
                op.result = self.copy_op(cmd, cloning, &mut op, &mut began)?;
                w.write(&op)?;
            }
            Ok(())
        })();
        if res.is_err() {
            if let Some(held) = began {
                self.region_release(Some(held));
            }
        }
        res?;
        *len = (n * size_of::<RegionOp>()) as u32;
        Ok(())
    }

    /// Whether `op` is well formed for `cmd`: `REGION_OP_HOLD` only with
    /// COPY_BEGIN (and COPY_END, which takes the same array back), never on
    /// a region of the head (the switch writes the target's head: such a
    /// region's copy does not make every later write to it mirrored, so
    /// holding its writes would gain nothing), and once a call at most
    /// (`holds` counts them): each hold may wait up to its limit.
    fn check_op(&self, cmd: CtlCmd, op: &RegionOp, holds: &mut u32) -> Result {
        match op.flags {
            0 => {}
            abi::REGION_OP_HOLD if cmd == CtlCmd::CopyEnd => {}
            abi::REGION_OP_HOLD if cmd == CtlCmd::CopyBegin && op.region >= self.head_regions() => {
                *holds += 1;
                if *holds > 1 {
                    return Err(EINVAL);
                }
            }
            _ => return Err(EINVAL),
        }
        if cmd == CtlCmd::Unsync && op.word != 0 {
            return Err(EINVAL);
        }
        Ok(())
    }

    /// One checked op of a copy command; `began` is set to the region
    /// whose hold it begins.
    fn copy_op(
        &self,
        cmd: CtlCmd,
        cloning: bool,
        op: &mut RegionOp,
        began: &mut Option<u64>,
    ) -> Result<u32> {
        if cmd == CtlCmd::CopyEnd {
            let end = if !cloning {
                abi::REGION_NOT_CLONING
            } else {
                match self.map().copy_end(op.region, op.word) {
                    Some(End::Committed) => abi::REGION_OK,
                    Some(End::Conflict) => {
                        self.stats.copy_conflicts.fetch_add(1, Ordering::Relaxed);
                        abi::REGION_CONFLICT
                    }
                    None => abi::REGION_RANGE,
                }
            };
            // Whatever the result, after the commit if there is one: the
            // writes it held are mirrored now.
            self.region_release(Some(op.region));
            return Ok(end);
        }
        if !cloning {
            return Ok(abi::REGION_NOT_CLONING);
        }
        Ok(match cmd {
            CtlCmd::CopyBegin if op.flags == abi::REGION_OP_HOLD => {
                self.copy_begin_held(op, began)?
            }
            CtlCmd::CopyBegin => self.copy_begin_one(op),
            CtlCmd::VerifyBegin => match self.map().verify_begin(op.region) {
                Some(Verify::Compare(word)) => {
                    op.word = word;
                    abi::REGION_OK
                }
                Some(Verify::Busy) => {
                    self.stats.copy_busy.fetch_add(1, Ordering::Relaxed);
                    abi::REGION_BUSY
                }
                Some(Verify::NotSynced) => abi::REGION_NOT_SYNCED,
                None => abi::REGION_RANGE,
            },
            CtlCmd::VerifyEnd => match self.map().verify_end(op.region, op.word) {
                Some(true) => abi::REGION_OK,
                Some(false) => abi::REGION_CONFLICT,
                None => abi::REGION_RANGE,
            },
            _ => {
                // Unsync. Under the hold lock, in CLONE: the switch enters
                // SWITCHING under it and then checks again that every
                // region is synced, so it sees this or refuses it.
                let _h = self.hold.lock();
                if self.mode_raw() != Mode::Clone as u32 {
                    abi::REGION_NOT_CLONING
                } else if op.region < self.geometry.regions() {
                    self.map().unsync(op.region);
                    abi::REGION_OK
                } else {
                    abi::REGION_RANGE
                }
            }
        })
    }

    /// COPY_BEGIN of one region: its word in `op` if it may be copied.
    fn copy_begin_one(&self, op: &mut RegionOp) -> u32 {
        match self.map().copy_begin(op.region) {
            Some(Begin::Copy(word)) => {
                op.word = word;
                abi::REGION_OK
            }
            Some(Begin::Busy) => {
                self.stats.copy_busy.fetch_add(1, Ordering::Relaxed);
                abi::REGION_BUSY
            }
            Some(Begin::Synced) => abi::REGION_SYNCED,
            None => abi::REGION_RANGE,
        }
    }

    // --- the region hold ----------------------------------------------------

    /// How long a region hold lasts at most, in ms: the attach-time hold
    /// timeout, but never more than [`REGION_HOLD_MS_MAX`].
    fn region_hold_ms(&self) -> u32 {
        self.hold_timeout_ms.min(REGION_HOLD_MS_MAX)
    }

    /// COPY_BEGIN with `REGION_OP_HOLD`: holds the writes to the region
    /// (`began` is set to it once they are held),
    /// waits (at most until the hold's deadline) for those in flight to it
    /// to finish, then begins the copy. A region that cannot be copied now
    /// is let go at once. Inside a switch's hold, while a hold, switch or
    /// detach command runs, and once the source's disk is going away, the
    /// copy begins without a region hold. A fatal signal ends the wait
    /// and the hold (`EINTR`).
    fn copy_begin_held(&self, op: &mut RegionOp, began: &mut Option<u64>) -> Result<u32> {
        let r = op.region;
        // Nothing to hold for a region that is synced or out of range.
        match self.map().copy_begin(r) {
            None => return Ok(abi::REGION_RANGE),
            Some(Begin::Synced) => return Ok(abi::REGION_SYNCED),
            Some(Begin::Busy | Begin::Copy(_)) => {}
        }
        let limit_ms = self.region_hold_ms();
        let deadline = now_ns() + i64::from(limit_ms) * 1_000_000;
        {
            let mut h = self.hold.lock();
            if self.mode_raw() != Mode::Clone as u32 {
                return Ok(abi::REGION_NOT_CLONING);
            }
            if self.holding.load(Ordering::SeqCst)
                || self.ctl_busy.load(Ordering::SeqCst)
                || self.detaching.load(Ordering::SeqCst)
                || self.source().disk_dead()
            {
                drop(h);
                return Ok(self.copy_begin_one(op));
            }
            if h.region.region != NO_REGION {
                // One region at a time.
                self.stats.copy_busy.fetch_add(1, Ordering::Relaxed);
                return Ok(abi::REGION_BUSY);
            }
            h.region.region = r;
            h.region.deadline_ns = deadline;
            // Armed before the hold is published: a failure or detach that
            // sees the hold queues the timer to run now, which this cannot
            // push back any more.
            self.region_work.schedule(&self.wq, limit_ms);
            self.region_owner.store(current_tgid(), Ordering::SeqCst);
            self.held_region.store(r, Ordering::SeqCst);
            self.region_holds.fetch_add(1, Ordering::Relaxed);
            *began = Some(r);
        }
        // A failure or detach that came before the hold was published did
        // not see it: end it now.
        if self.failing() || self.detaching.load(Ordering::SeqCst) {
            self.region_work.schedule(&self.wq, 0);
        }
        // New writes to `r` are queued now; those in flight finish. Woken
        // by `write_done`, by a failure and by the end of the hold.
        let waited = self.events.wait_until_killable(ms_until(deadline), || {
            crate::region::inflight(self.map().load(r)) == 0
                || self.held_region.load(Ordering::SeqCst) != r
                || self.failing()
                || self.detaching.load(Ordering::SeqCst)
                || self.source().disk_dead()
        });
        if waited.is_none() {
            self.region_release(Some(r));
            return Err(EINTR);
        }
        if self.mode_raw() != Mode::Clone as u32 {
            self.region_release(Some(r));
            return Ok(abi::REGION_NOT_CLONING);
        }
        let res = self.copy_begin_one(op);
        if res != abi::REGION_OK {
            self.region_release(Some(r));
        }
        Ok(res)
    }

    /// Queues the write `bio` (over `regions`) in the region hold; a
    /// `REQ_NOWAIT` bio is completed with `BLK_STS_AGAIN` instead (its
    /// submitter retries it without the flag). Hands it back if the hold
    /// has ended meanwhile.
    fn region_hold_bio(&self, bio: Bio, regions: Regions) -> core::result::Result<(), Bio> {
        let mut h = self.hold.lock();
        if !(regions.start..regions.end).contains(&h.region.region) {
            return Err(bio);
        }
        if bio.nowait() {
            drop(h);
            bio.end_would_block();
            return Ok(());
        }
        self.owned.fetch_add(1, Ordering::SeqCst);
        self.region_writes_held.fetch_add(1, Ordering::Relaxed);
        if h.region.first_held_ns == 0 {
            h.region.first_held_ns = now_ns();
        }
        h.region.held.push(bio);
        Ok(())
    }

    /// Ends the region hold in `h` and takes its bios, recording how long
    /// the first of them waited.
    fn end_region_hold(&self, h: &mut Hold) -> BioList {
        h.region.region = NO_REGION;
        self.held_region.store(NO_REGION, Ordering::SeqCst);
        if h.region.first_held_ns != 0 {
            let waited = u64::try_from(now_ns() - h.region.first_held_ns).unwrap_or(0);
            self.region_hold_longest_ns
                .fetch_max(waited, Ordering::Relaxed);
            h.region.first_held_ns = 0;
        }
        h.region.held.take()
    }

    /// A switch's hold begins (`h` is its lock): the region hold ends, and
    /// the writes it kept join the held ones, released with them. The
    /// caller wakes `events` once the lock is dropped.
    fn region_into_hold(&self, h: &mut Hold) {
        if h.region.region == NO_REGION {
            return;
        }
        let mut moved = self.end_region_hold(h);
        while let Some(bio) = moved.pop() {
            // The bio keeps its `owned` count.
            self.held_count.fetch_add(1, Ordering::Relaxed);
            if h.first_held_ns == 0 {
                h.first_held_ns = now_ns();
            }
            h.held.push(bio);
        }
    }

    /// Ends the region hold (only if it holds `only`, when given) and
    /// resubmits its writes. Process context.
    fn region_release(&self, only: Option<u64>) {
        if only.is_some_and(|o| self.held_region.load(Ordering::SeqCst) != o) {
            // Not the held region (every COPY_END asks): no lock taken.
            return;
        }
        let held = {
            let mut h = self.hold.lock();
            let r = h.region.region;
            if r == NO_REGION || only.is_some_and(|o| o != r) {
                return;
            }
            self.end_region_hold(&mut h)
        };
        self.events.wake_all();
        self.region_dispatch(held);
    }

    /// Routes the bios a region hold kept anew (process context).
    fn region_dispatch(&self, mut held: BioList) {
        while let Some(bio) = held.pop() {
            if let Some(bio) = self.route(bio) {
                bio.submit();
            }
            // The region hold's count, dropped after the bio found its way.
            self.bio_done();
        }
    }

    /// The region hold's timer: ends it at its deadline, after a failure,
    /// and when a detach begins.
    fn region_expired(&self) {
        let timed_out;
        let held = {
            let mut h = self.hold.lock();
            if h.region.region == NO_REGION {
                return;
            }
            if self.mode_raw() == Mode::Clone as u32
                && !self.detaching.load(Ordering::SeqCst)
                && before_last_tick(h.region.deadline_ns)
            {
                // Early (the timer is armed short of long deadlines), or
                // the timer of an earlier hold: wait the rest.
                let left = u32::try_from(ms_until(h.region.deadline_ns)).unwrap_or(u32::MAX);
                drop(h);
                self.region_work.schedule(&self.wq, left.max(1));
                // A failure or detach between the check and the re-arm
                // queued the work to run now, which the re-arm pushed back.
                if self.failing() || self.detaching.load(Ordering::SeqCst) {
                    self.region_work.schedule(&self.wq, 0);
                }
                return;
            }
            timed_out =
                self.mode_raw() == Mode::Clone as u32 && !self.detaching.load(Ordering::SeqCst);
            self.end_region_hold(&mut h)
        };
        self.events.wake_all();
        self.region_dispatch(held);
        // Said once the writes are on their way: a console write is slow.
        if timed_out {
            pr_warn!("region hold timed out: writes to the region released\n");
        }
    }

    fn synced_map(&self, buf: UserSlice, len: &mut u32) -> Result {
        let head = size_of::<SyncedQuery>();
        if (*len as usize) < head {
            return Err(EINVAL);
        }
        let (mut r, mut w) = buf.reader_writer();
        let mut q: SyncedQuery = r.read()?;
        let room = ((*len as usize - head) * 8) as u64;
        let total = self.geometry.regions();
        let first = q.first.min(total);
        q.count = q.count.min(room).min(total - first);
        q.first = first;
        w.write(&q)?;
        let mut chunk = [0u8; 64];
        let mut done = 0u64;
        while done < q.count {
            let bits = (q.count - done).min(chunk.len() as u64 * 8);
            chunk.fill(0);
            for i in 0..bits {
                if crate::region::is_synced(self.map().load(first + done + i)) {
                    chunk[(i / 8) as usize] |= 1 << (i % 8);
                }
            }
            w.write_slice(&chunk[..bits.div_ceil(8) as usize])?;
            done += bits;
        }
        *len = (head as u64 + q.count.div_ceil(8)) as u32;
        Ok(())
    }

    /// Claims the hold/switch commands for the caller.
    fn ctl_claim(&self) -> Result<CtlGuard<'_>> {
        self.ctl_busy
            .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
            .map_err(|_| EBUSY)?;
        Ok(CtlGuard(&self.ctl_busy))
    }
}

/// The hold's work function.
///
/// # Safety
///
/// Called by the workqueue for the `hold_work` of a live `Migration` (the
/// work is cancelled before the migration is dropped).
unsafe extern "C" fn hold_work_fn(work: *mut bindings::work_struct) {
    // SAFETY: `work` belongs to the `hold_work` field of a `Migration`.
    let mig =
        unsafe { &*kernel::container_of!(DelayedWork::from_work(work), Migration, hold_work) };
    mig.hold_expired();
}

/// The region hold's work function.
///
/// # Safety
///
/// Called by the workqueue for the `region_work` of a live `Migration`
/// (the work is cancelled before the migration is dropped).
unsafe extern "C" fn region_work_fn(work: *mut bindings::work_struct) {
    // SAFETY: `work` belongs to the `region_work` field of a `Migration`.
    let mig =
        unsafe { &*kernel::container_of!(DelayedWork::from_work(work), Migration, region_work) };
    mig.region_expired();
}

/// The switch I/O worker's function.
///
/// # Safety
///
/// Called by the workqueue for the `submit_work` of a live `Migration`
/// (the work is cancelled before the migration is dropped).
unsafe extern "C" fn submit_work_fn(work: *mut bindings::work_struct) {
    // SAFETY: `work` belongs to the `submit_work` field of a `Migration`.
    let mig =
        unsafe { &*kernel::container_of!(DelayedWork::from_work(work), Migration, submit_work) };
    mig.sync.submit_queued();
}

/// The target's switch I/O worker's function.
///
/// # Safety
///
/// Called by the workqueue for the `tsubmit_work` of a live `Migration`
/// (the work is cancelled before the migration is dropped).
unsafe extern "C" fn tsubmit_work_fn(work: *mut bindings::work_struct) {
    // SAFETY: `work` belongs to the `tsubmit_work` field of a `Migration`.
    let mig =
        unsafe { &*kernel::container_of!(DelayedWork::from_work(work), Migration, tsubmit_work) };
    mig.tsync.submit_queued();
}

impl Filter for Migration {
    const NAME: &'static CStr = c_str!("blkmig");

    fn attach(source: &BlockDevice, opt: &[u8], holder: Holder) -> Result<Pin<KBox<Self>>> {
        let opts = Options::parse(opt)?;
        if opts.target == source.dev() {
            return Err(EXDEV);
        }
        if source.is_zoned() {
            return Err(errno(bindings::EOPNOTSUPP));
        }
        if !source.is_request_based() {
            // A bio-based driver (dm, md, NVMe multipath) may have writes
            // in flight that the attach drain cannot wait for.
            return Err(errno(bindings::EMEDIUMTYPE));
        }
        let target = OpenDevice::open_exclusive(opts.target, holder)?;
        let t = target.bdev();
        if t.overlaps(source) {
            return Err(EXDEV);
        }
        if t.is_zoned() {
            return Err(errno(bindings::EOPNOTSUPP));
        }
        if t.has_filter() {
            // Its own migration would see our mirrored writes as writes
            // of its source, and could mirror them back to ours.
            return Err(EBUSY);
        }
        if source.holder_ops() == holder.ops() {
            // The source is the target of another migration.
            return Err(EBUSY);
        }
        let sectors = source.nr_sectors();
        if t.nr_sectors() < sectors {
            return Err(ENOSPC);
        }
        if t.logical_block_size() > source.logical_block_size() {
            // A write the source takes could not be mirrored.
            return Err(EINVAL);
        }
        let region_bytes = 1u64 << opts.region_shift;
        for lbs in [source.logical_block_size(), t.logical_block_size()] {
            if lbs == 0 || region_bytes % u64::from(lbs) != 0 {
                return Err(EINVAL);
            }
        }
        let geometry = Geometry::new(sectors, opts.region_shift).map_err(|_| EINVAL)?;
        if geometry.regions() > abi::REGIONS_MAX {
            return Err(E2BIG);
        }
        // GFP_KERNEL is fine: attach runs from the ioctl, outside any
        // filtered bio.
        let words = alloc_words(geometry.regions())?;
        let zeroed = flags::GFP_KERNEL | flags::__GFP_ZERO;
        let marker_page = Page::alloc_page(zeroed)?;
        let zero_page = Page::alloc_page(zeroed)?;
        let npages = geometry.head_bytes().div_ceil(PAGE_SIZE as u64) as usize;
        let mut head_pages = KVec::with_capacity(npages, flags::GFP_KERNEL)?;
        for _ in 0..npages {
            head_pages.push(Page::alloc_page(zeroed)?, flags::GFP_KERNEL)?;
        }
        let wq = WorkQueue::new(c_str!("blkmig"))?;
        let io_wq = WorkQueue::new(c_str!("blkmig_io"))?;
        let tio_wq = WorkQueue::new(c_str!("blkmig_tio"))?;
        let m = KBox::try_pin_init(
            try_pin_init!(&this in Self {
                target,
                geometry,
                words,
                source: source.as_ptr(),
                hold_timeout_ms: opts.hold_timeout_ms,
                mode: AtomicU32::new(Mode::Clone as u32),
                failure: AtomicU32::new(Failure::None as u32),
                failure_errno: AtomicI32::new(0),
                pending_failure: AtomicU32::new(Failure::None as u32),
                pending_errno: AtomicI32::new(0),
                fenced: AtomicBool::new(false),
                edge_warned: AtomicBool::new(false),
                target_gone: AtomicBool::new(false),
                holding: AtomicBool::new(false),
                hold_owner: AtomicI32::new(0),
                hold <- new_spinlock!(
                    Hold {
                        deadline_ns: 0,
                        held: BioList::new(),
                        first_held_ns: 0,
                        region: RegionHold {
                            region: NO_REGION,
                            deadline_ns: 0,
                            held: BioList::new(),
                            first_held_ns: 0,
                        },
                    },
                    "blkmig_hold"
                ),
                ctl_busy: AtomicBool::new(false),
                inflight_writes: AtomicU64::new(0),
                held_count: AtomicU64::new(0),
                held_region: AtomicU64::new(NO_REGION),
                region_owner: AtomicI32::new(0),
                detaching: AtomicBool::new(false),
                region_holds: AtomicU64::new(0),
                region_writes_held: AtomicU64::new(0),
                region_hold_longest_ns: AtomicU64::new(0),
                head_reads: AtomicU64::new(0),
                owned: AtomicU64::new(0),
                stats: Counters::default(),
                migration_id: sys::random_u64(),
                holds: AtomicU64::new(0),
                hold_longest_ns: AtomicU64::new(0),
                head_writes: AtomicU64::new(0),
                retire_failed: AtomicBool::new(false),
                target_head_dirty: AtomicBool::new(false),
                marker_page,
                zero_page,
                head_pages,
                events <- WaitQueue::new(),
                // SAFETY: `events` is a field of the same object, so it
                // outlives `sync`; the object waits for `sync` to be idle
                // before it is dropped.
                sync: unsafe { SyncIo::new(ptr::addr_of!((*this.as_ptr()).events)) },
                // SAFETY: As for `sync`.
                tsync: unsafe { SyncIo::new(ptr::addr_of!((*this.as_ptr()).events)) },
                hold_work <- DelayedWork::new(hold_work_fn),
                region_work <- DelayedWork::new(region_work_fn),
                submit_work <- DelayedWork::new(submit_work_fn),
                tsubmit_work <- DelayedWork::new(tsubmit_work_fn),
                wq,
                io_wq,
                tio_wq,
                ctx_set <- BioSet::new(POOL, bio::CTX_PAD, false),
                plain_set <- BioSet::new(POOL, 0, false),
                io_set <- BioSet::new(4, 0, true),
            }? Error),
            flags::GFP_KERNEL,
        )?;
        pr_info!(
            "attached to {}:{}, target {}:{}, {} regions of {} KiB\n",
            source.dev().major(),
            source.dev().minor(),
            opts.target.major(),
            opts.target.minor(),
            geometry.regions(),
            region_bytes >> 10
        );
        Ok(m)
    }

    fn may_detach(&self) -> Result {
        if self.mode_raw() == Mode::Redirect as u32 && self.source().openers() > 1 {
            // The filesystem would fall back to the retired source.
            return Err(EBUSY);
        }
        // No hold, switch or release may be running (the filter is
        // unpublished before the core waits for commands: a switch would
        // retire the source under writes that pass it unfiltered), and none
        // may start. Never given back: the filter is going.
        self.ctl_busy
            .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
            .map_err(|_| EBUSY)?;
        // No region hold starts from now on; the one there ends.
        self.detaching.store(true, Ordering::SeqCst);
        self.events.wake_all();
        if self.held_region.load(Ordering::SeqCst) != NO_REGION {
            self.region_work.schedule(&self.wq, 0);
        }
        Ok(())
    }

    fn ctl(&self, cmd: u32, buf: UserSlice, len: &mut u32) -> Result {
        match CtlCmd::from_raw(cmd) {
            Some(CtlCmd::Status) => {
                if (*len as usize) < size_of::<Status>() {
                    return Err(EINVAL);
                }
                buf.writer().write(&self.status())?;
                *len = size_of::<Status>() as u32;
                Ok(())
            }
            Some(
                c @ (CtlCmd::CopyBegin
                | CtlCmd::CopyEnd
                | CtlCmd::VerifyBegin
                | CtlCmd::VerifyEnd
                | CtlCmd::Unsync),
            ) => self.copy(c, buf, len),
            Some(CtlCmd::SyncedMap) => self.synced_map(buf, len),
            Some(CtlCmd::HoldWrites) => {
                let _busy = self.ctl_claim()?;
                self.hold_writes(buf, *len)?;
                *len = 0;
                Ok(())
            }
            Some(CtlCmd::Switch) => {
                let _busy = self.ctl_claim()?;
                if *len as usize != size_of::<u64>() {
                    return Err(EINVAL);
                }
                let head_writes: u64 = buf.reader().read()?;
                self.switch(head_writes)?;
                *len = 0;
                Ok(())
            }
            Some(CtlCmd::Release) => {
                let _busy = self.ctl_claim()?;
                if self.mode_raw() != Mode::Redirect as u32 {
                    self.release();
                }
                *len = 0;
                Ok(())
            }
            None => Err(EINVAL),
        }
    }

    fn submit_bio(&self, bio: Bio) -> Option<Bio> {
        self.route(bio)
    }

    fn serving(&self) -> bool {
        // REDIRECT is final: every bio goes to the target from now on, so
        // the source's disk may go (the source was retired at the switch),
        // unless the target went away, or lies on the same disk and goes
        // with it.
        self.mode_raw() == Mode::Redirect as u32
            && !self.target_gone.load(Ordering::SeqCst)
            && self.target.bdev().disk_id() != self.source().disk_id()
    }

    fn holder_dead(&self) {
        self.target_gone.store(true, Ordering::SeqCst);
        self.fail(Failure::TargetGone, bindings::ENODEV as i32);
    }
}

#[pinned_drop]
impl PinnedDrop for Migration {
    fn drop(self: Pin<&mut Self>) {
        // No filter call is running or can start (the core waited for
        // them). Held writes go to the source, unless we redirect.
        let _ = self.mode.compare_exchange(
            Mode::Clone as u32,
            Mode::Failed as u32,
            Ordering::SeqCst,
            Ordering::SeqCst,
        );
        self.hold_work.cancel_sync();
        self.region_work.cancel_sync();
        self.submit_work.cancel_sync();
        self.tsubmit_work.cancel_sync();
        self.sync.cancel();
        self.tsync.cancel();
        self.region_release(None);
        self.release();
        // Every bio we took or submitted must be finished before the target
        // is closed, the bio sets go and the module may be unloaded. The
        // device's own I/O timeout bounds this wait.
        while !self.events.wait_until(DRAIN_REPORT_MS, || {
            self.owned.load(Ordering::SeqCst) == 0 && self.sync.idle() && self.tsync.idle()
        }) {
            pr_warn!(
                "detach waits for {} bios still in flight\n",
                self.owned.load(Ordering::SeqCst)
            );
        }
        // A completion's last count and wake-up run in an RCU read-side
        // section (`count_down`, `sync_end`): after a grace period none of
        // them touches this object any more. (The few instructions that
        // return from such a callback after its section are the same window
        // every module that completes bios has.)
        sys::synchronize_rcu();
        if self.mode_raw() == Mode::Redirect as u32 {
            // The source's page cache was filled from the target: drop it
            // before anything can read the retired source through it.
            self.source().invalidate_cache();
        }
        pr_info!("detached\n");
    }
}
