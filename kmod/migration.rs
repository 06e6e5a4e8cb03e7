// SPDX-License-Identifier: GPL-2.0-only
//! The `blkmig` filter: one migration of a source device to a target.
//!
//! CLONE: reads pass to the source (reads of the first region are tracked
//! for the switch); every write is accounted in the region map (epoch and
//! in-flight count of each region it touches) and sent to the source as a
//! clone; a write touching a SYNCED region is also mirrored to the target.
//! The original completes when all its clones have, with the source's
//! status. The copier drives COPY_BEGIN/COPY_END.
//!
//! Switch: HOLD_WRITES makes new writes wait in their submitter's context
//! (their deadline is enforced by the waiters themselves, so a vanished
//! copier cannot hold them past the timeout); SWITCH checks that every
//! region is synced, flushes the target, sends reads to the target, writes
//! the retire marker over the source's first region, and turns to
//! REDIRECT, where every bio goes to the target.

use core::{
    mem::{offset_of, size_of},
    ptr,
    sync::atomic::{AtomicBool, AtomicI32, AtomicI64, AtomicU32},
};

use kernel::{
    alloc::flags,
    bindings, c_str,
    page::Page,
    prelude::*,
    time::Ktime,
    types::{AsBytes, FromBytes},
    uaccess::UserSlice,
};

use crate::{
    abi::{
        self, AttachOptions, CtlCmd, HoldRequest, Mode, RegionOp, RetireMarker, Status,
        SyncedQuery,
    },
    bdev::{Bio, BlockDevice, DevT, Op, OpenDevice},
    filter::{Filter, Holder},
    io::{self, BioSet, Kind},
    region::{Begin, End, Geometry, RegionMap, Regions},
    sync::{AtomicU64, Ordering},
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

/// Internal mode between CLONE and REDIRECT: writes held, reads to the
/// target, the source being retired. Reported as CLONE (holding).
const MODE_SWITCHING: u32 = 3;
/// `BLK_STS_AGAIN`: a `REQ_NOWAIT` write that would have to wait.
const BLK_STS_AGAIN: u8 = 12;
/// Bios reserved in each bio set (forward progress under memory pressure).
const POOL: u32 = 64;
/// Most pages in one retire-marker bio (`BIO_MAX_VECS`).
const MAX_VECS: u64 = 256;
const PAGE: u64 = 4096;

fn etimedout() -> Error {
    Error::from_errno(-(bindings::ETIMEDOUT as i32))
}

fn now_ns() -> i64 {
    Ktime::ktime_get().to_ns()
}

/// Sleeps a little, in process context.
fn nap() {
    // SAFETY: Called only from process context (ioctl, submitter, detach).
    unsafe { bindings::usleep_range_state(50, 150, bindings::TASK_UNINTERRUPTIBLE) };
}

fn current_tgid() -> i32 {
    kernel::current!().group_leader().pid()
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

/// Allocates `n` zeroed region words (`kvmalloc`).
fn alloc_words(n: u64) -> Result<KVVec<AtomicU64>> {
    let n = usize::try_from(n).map_err(|_| ENOMEM)?;
    let mut words = KVVec::with_capacity(n, flags::GFP_KERNEL)?;
    for _ in 0..n {
        // Cannot allocate: the capacity is reserved above.
        words.push(AtomicU64::new(0), flags::GFP_KERNEL)?;
    }
    Ok(words)
}

/// Event counters, reported by [`CtlCmd::Status`].
#[derive(Default)]
struct Counters {
    writes_held: AtomicU64,
    writes_seen: AtomicU64,
    writes_mirrored: AtomicU64,
    bios_redirected: AtomicU64,
    copy_conflicts: AtomicU64,
    copy_busy: AtomicU64,
}

/// One attached migration.
#[pin_data(PinnedDrop)]
pub(crate) struct Migration {
    geometry: Geometry,
    words: KVVec<AtomicU64>,
    target: OpenDevice,
    /// The filtered device (valid until detach has returned).
    source: *mut bindings::block_device,
    hold_timeout_ms: u32,
    mode: AtomicU32,
    failure: AtomicU32,
    failure_errno: AtomicI32,
    holding: AtomicBool,
    hold_deadline_ns: AtomicI64,
    hold_owner: AtomicI32,
    /// Writes accounted in the map and not yet completed.
    inflight_writes: AtomicU64,
    /// Reads of the first region sent to the source, not yet completed.
    head_reads: AtomicU64,
    /// Bios the filter took and has not completed yet.
    owned: AtomicU64,
    stats: Counters,
    retire_failed: AtomicBool,
    marker_page: Page,
    zero_page: Page,
    #[pin]
    ctx_set: BioSet,
    #[pin]
    plain_set: BioSet,
}

// SAFETY: `source` is only used through `&BlockDevice` for the filtered
// device, which the filter core keeps alive while the filter is attached;
// everything else is atomics, owned allocations, or bio sets that the block
// layer lets any thread use.
unsafe impl Send for Migration {}
// SAFETY: See `Send`; all shared state is atomic.
unsafe impl Sync for Migration {}

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

    /// The reply to [`CtlCmd::Status`].
    fn status(&self) -> Status {
        let target = self.target.bdev();
        let dev = target.dev();
        let raw = self.mode_raw();
        let mode = if raw == MODE_SWITCHING {
            Mode::Clone as u32
        } else {
            raw
        };
        let holding = raw == MODE_SWITCHING
            || (self.holding.load(Ordering::SeqCst)
                && now_ns() < self.hold_deadline_ns.load(Ordering::SeqCst));
        let mut flags = 0;
        if holding {
            flags |= abi::STATUS_HOLDING;
        }
        if self.retire_failed.load(Ordering::Relaxed) {
            flags |= abi::STATUS_RETIRE_FAILED;
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
            writes_held: self.stats.writes_held.load(Ordering::Relaxed),
            bios_redirected: self.stats.bios_redirected.load(Ordering::Relaxed),
            failure: self.failure.load(Ordering::Relaxed),
            failure_errno: self.failure_errno.load(Ordering::Relaxed),
            target_major: dev.major(),
            target_minor: dev.minor(),
        }
    }

    /// A write accounted with `write_submit` has completed on every leg.
    pub(crate) fn write_done(&self, regions: Regions) {
        self.map().write_complete(regions);
        self.inflight_writes.fetch_sub(1, Ordering::SeqCst);
    }

    /// A tracked read of the first region has completed.
    pub(crate) fn head_read_done(&self) {
        self.head_reads.fetch_sub(1, Ordering::SeqCst);
    }

    /// A bio the filter took has completed. Must be the caller's last use
    /// of `self`: detach waits for this count to reach zero.
    pub(crate) fn bio_done(&self) {
        self.owned.fetch_sub(1, Ordering::Release);
    }

    /// The target leg of a mirrored write failed with `status`.
    pub(crate) fn target_error(&self, regions: Regions, status: u8, discard: bool) {
        if discard && status == bindings::BLK_STS_NOTSUPP {
            // The target cannot discard: the regions no longer track the
            // source and are copied again.
            for r in regions.start..regions.end {
                self.map().unsync(r);
            }
            return;
        }
        // SAFETY: `blk_status_to_errno` only maps a number.
        let errno = -unsafe { bindings::blk_status_to_errno(status) };
        self.fail(abi::Failure::TargetWrite, errno);
    }

    /// Stops the migration: the source stays authoritative.
    fn fail(&self, why: abi::Failure, errno: i32) {
        for from in [Mode::Clone as u32, MODE_SWITCHING] {
            if self
                .mode
                .compare_exchange(from, Mode::Failed as u32, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok()
            {
                self.failure.store(why as u32, Ordering::Relaxed);
                self.failure_errno.store(errno, Ordering::Relaxed);
                self.holding.store(false, Ordering::SeqCst);
                pr_err!("migration failed ({:?}, errno {}): mirroring stopped, the source stays authoritative\n", why as u32, errno);
                return;
            }
        }
    }

    /// Waits while writes are held, at most until the hold's deadline, at
    /// which the hold is cancelled. Returns when the caller may go on.
    fn wait_released(&self) {
        self.stats.writes_held.fetch_add(1, Ordering::Relaxed);
        loop {
            let switching = self.mode_raw() == MODE_SWITCHING;
            if !switching && !self.holding.load(Ordering::SeqCst) {
                break;
            }
            // The switch itself (marker write) is not stalled: wait it out.
            if !switching && now_ns() >= self.hold_deadline_ns.load(Ordering::SeqCst) {
                if self.holding.swap(false, Ordering::SeqCst) {
                    pr_warn!("write hold timed out: writes released, switch cancelled\n");
                }
                break;
            }
            nap();
        }
        self.stats.writes_held.fetch_sub(1, Ordering::Relaxed);
    }

    /// Whether a write by the current task must wait: writes are held and
    /// it is not the task group that holds them (whose own writes, such as
    /// the page-cache writeback its O_DIRECT reads force, must go through).
    fn held(&self) -> bool {
        self.holding.load(Ordering::SeqCst) && current_tgid() != self.hold_owner.load(Ordering::SeqCst)
    }

    /// Sends `bio` to the target only. Always takes it.
    fn redirect(&self, bio: &Bio) -> bool {
        self.owned.fetch_add(1, Ordering::Relaxed);
        self.stats.bios_redirected.fetch_add(1, Ordering::Relaxed);
        let orig = bio.as_ptr();
        let sector = if bio.nr_sectors() > 0 { bio.sector_in(self.source()) } else { 0 };
        // SAFETY: `orig` is the bio the hook lends us, the target is open.
        let c = unsafe { io::clone(orig, self.target.bdev().as_ptr(), &self.ctx_set) };
        if c.is_null() {
            // SAFETY: We took `orig`; it is completed here, once.
            unsafe { io::complete(orig, bindings::BLK_STS_RESOURCE) };
            self.bio_done();
            return true;
        }
        let none = Regions { start: 0, end: 0 };
        // SAFETY: `c` comes from `ctx_set` (CTX_PAD front pad) and is not
        // submitted; `self` waits for `owned` before it goes.
        unsafe {
            let ctx = io::init_ctx(c, orig, self, Kind::Redirect, none, 1);
            io::arm(c, sector, io::redirect_end, ctx);
            io::submit(c);
        }
        true
    }

    /// Sends a read of the first region to the source, tracked, so that the
    /// switch can wait for it before it overwrites that region.
    fn tracked_read(&self, bio: &Bio) -> bool {
        self.owned.fetch_add(1, Ordering::Relaxed);
        let orig = bio.as_ptr();
        // SAFETY: `orig` is lent to us by the hook; its device is live.
        let c = unsafe { io::clone(orig, (*orig).bi_bdev, &self.ctx_set) };
        if c.is_null() {
            self.head_read_done();
            self.bio_done();
            return false;
        }
        let none = Regions { start: 0, end: 0 };
        // SAFETY: As in `redirect`; the clone goes back to the filtered
        // device, so it is marked as filtered.
        unsafe {
            let ctx = io::init_ctx(c, orig, self, Kind::HeadRead, none, 1);
            io::set_filtered(c);
            io::arm(c, (*orig).bi_iter.bi_sector, io::redirect_end, ctx);
            io::submit(c);
        }
        true
    }

    fn clone_read(&self, bio: &Bio) -> bool {
        let regions = self.geometry.regions_of(bio.sector_in(self.source()), bio.nr_sectors());
        if regions.is_empty() || regions.start != 0 {
            return false;
        }
        // Count first, then look at the mode: pairs with `switch`.
        self.head_reads.fetch_add(1, Ordering::SeqCst);
        match self.mode_raw() {
            m if m == Mode::Clone as u32 => self.tracked_read(bio),
            m => {
                self.head_read_done();
                if m == Mode::Failed as u32 {
                    false
                } else {
                    self.redirect(bio)
                }
            }
        }
    }

    fn clone_write(&self, bio: &Bio) -> bool {
        if bio.nr_sectors() == 0 {
            // An empty flush: the source is authoritative, nothing to track.
            return false;
        }
        // Account first, then look at the hold: pairs with `hold_writes`,
        // whose drain then either sees this write or this write sees the
        // hold.
        loop {
            self.inflight_writes.fetch_add(1, Ordering::SeqCst);
            let mode = self.mode_raw();
            if mode == Mode::Clone as u32 && !self.held() {
                break;
            }
            self.inflight_writes.fetch_sub(1, Ordering::SeqCst);
            if mode == Mode::Redirect as u32 {
                return self.redirect(bio);
            }
            if mode == Mode::Failed as u32 {
                return false;
            }
            if bio.is_nowait() {
                // SAFETY: We take `bio` and complete it here, once.
                unsafe { io::complete(bio.as_ptr(), BLK_STS_AGAIN) };
                return true;
            }
            self.wait_released();
        }
        let regions = self.geometry.regions_of(bio.sector_in(self.source()), bio.nr_sectors());
        let mirror = self.map().write_submit(regions);
        self.stats.writes_seen.fetch_add(1, Ordering::Relaxed);
        self.owned.fetch_add(1, Ordering::Relaxed);
        let orig = bio.as_ptr();
        // SAFETY: `orig` is lent to us by the hook; its device is live.
        let src = unsafe { io::clone(orig, (*orig).bi_bdev, &self.ctx_set) };
        if src.is_null() {
            // Let it through untracked: its regions must be copied again.
            for r in regions.start..regions.end {
                self.map().unsync(r);
            }
            self.write_done(regions);
            self.bio_done();
            return false;
        }
        let tgt = if mirror {
            // SAFETY: As above; the target is open.
            unsafe { io::clone(orig, self.target.bdev().as_ptr(), &self.plain_set) }
        } else {
            ptr::null_mut()
        };
        if mirror && tgt.is_null() {
            for r in regions.start..regions.end {
                self.map().unsync(r);
            }
        }
        let legs = if tgt.is_null() { 1 } else { 2 };
        // SAFETY: `src` comes from `ctx_set`, neither clone is submitted;
        // the source clone goes back to the filtered device (marked as
        // filtered, same sector), the target clone to the target at the
        // write's offset in the filtered device. `self` waits for `owned`.
        unsafe {
            let ctx = io::init_ctx(src, orig, self, Kind::Write, regions, legs);
            io::set_filtered(src);
            io::arm(src, (*orig).bi_iter.bi_sector, io::source_end, ctx);
            if !tgt.is_null() {
                io::arm(tgt, bio.sector_in(self.source()), io::target_end, ctx);
                self.stats.writes_mirrored.fetch_add(1, Ordering::Relaxed);
            }
            io::submit(src);
            if !tgt.is_null() {
                io::submit(tgt);
            }
        }
        true
    }

    fn copy(&self, cmd: CtlCmd, buf: UserSlice, len: &mut u32) -> Result {
        let n = *len as usize / size_of::<RegionOp>();
        if *len as usize % size_of::<RegionOp>() != 0 || n > abi::REGION_OPS_MAX as usize {
            return Err(EINVAL);
        }
        let (mut r, mut w) = buf.reader_writer();
        let cloning = self.mode_raw() == Mode::Clone as u32;
        for _ in 0..n {
            let mut op: RegionOp = r.read()?;
            op.result = if !cloning {
                abi::REGION_NOT_CLONING
            } else if cmd == CtlCmd::CopyBegin {
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
            w.write(&op)?;
        }
        *len = (n * size_of::<RegionOp>()) as u32;
        Ok(())
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

    /// Waits until no accounted write is in flight, at most until the
    /// hold's deadline.
    fn drain(&self) -> Result {
        while self.inflight_writes.load(Ordering::SeqCst) != 0 {
            if now_ns() >= self.hold_deadline_ns.load(Ordering::SeqCst) {
                self.holding.store(false, Ordering::SeqCst);
                return Err(etimedout());
            }
            nap();
        }
        Ok(())
    }

    fn hold_writes(&self, buf: UserSlice, len: u32) -> Result {
        if self.mode_raw() != Mode::Clone as u32 {
            return Err(EINVAL);
        }
        if (len as usize) < size_of::<HoldRequest>() {
            return Err(EINVAL);
        }
        let req: HoldRequest = buf.reader().read()?;
        let ms = match req.timeout_ms {
            0 => self.hold_timeout_ms,
            ms => ms.min(abi::HOLD_TIMEOUT_MS_MAX),
        };
        self.hold_owner.store(current_tgid(), Ordering::SeqCst);
        self.hold_deadline_ns
            .store(now_ns() + i64::from(ms) * 1_000_000, Ordering::SeqCst);
        self.holding.store(true, Ordering::SeqCst);
        self.drain()
    }

    fn switch(&self) -> Result {
        if self.mode_raw() != Mode::Clone as u32 {
            return Err(EINVAL);
        }
        if !self.holding.load(Ordering::SeqCst)
            || now_ns() >= self.hold_deadline_ns.load(Ordering::SeqCst)
        {
            self.holding.store(false, Ordering::SeqCst);
            return Err(etimedout());
        }
        self.drain()?;
        if !self.map().all_synced() {
            return Err(EAGAIN);
        }
        // The target must hold everything durably before the source is
        // retired.
        // SAFETY: The target is open.
        let r = unsafe { bindings::blkdev_issue_flush(self.target.bdev().as_ptr()) };
        if r != 0 {
            self.fail(abi::Failure::TargetFlush, -r);
            return Err(EIO);
        }
        // The flush may have taken the rest of the hold: writers waiting
        // past the deadline have gone on by themselves, so give up rather
        // than make them wait again for the marker.
        if !self.holding.load(Ordering::SeqCst)
            || now_ns() >= self.hold_deadline_ns.load(Ordering::SeqCst)
        {
            self.holding.store(false, Ordering::SeqCst);
            return Err(etimedout());
        }
        // From here every write waits (past the deadline too: the switch is
        // not stalled, it is writing the marker), reads go to the target.
        // Then the reads of the first region still in flight on the source
        // drain.
        self.mode.store(MODE_SWITCHING, Ordering::SeqCst);
        while self.head_reads.load(Ordering::SeqCst) != 0
            || self.inflight_writes.load(Ordering::SeqCst) != 0
        {
            nap();
        }
        if let Err(e) = self.retire_source() {
            self.retire_failed.store(true, Ordering::Relaxed);
            pr_warn!("could not write the retire marker on the source ({:?}); switching anyway\n", e);
        }
        self.mode.store(Mode::Redirect as u32, Ordering::SeqCst);
        self.holding.store(false, Ordering::SeqCst);
        pr_info!("switched: every bio now goes to the target\n");
        Ok(())
    }

    /// Overwrites the source's first region with the retire marker and
    /// zeros, durably.
    fn retire_source(&self) -> Result {
        let src = self.source();
        let target = self.target.bdev();
        let marker = RetireMarker {
            magic: abi::RETIRE_MAGIC,
            version: abi::ABI_VERSION,
            target_major: target.dev().major(),
            target_minor: target.dev().minor(),
            reserved: 0,
            // SAFETY: Reads the clock.
            switched_at: unsafe { bindings::ktime_get_real_seconds() } as u64,
            target_sectors: target.nr_sectors(),
        };
        // SAFETY: `marker` is valid for its size, which fits in the page.
        unsafe {
            self.marker_page.write_raw(
                ptr::from_ref(&marker).cast::<u8>(),
                0,
                size_of::<RetireMarker>(),
            )?
        };
        let (_, len) = self.geometry.region_span(0).ok_or(EINVAL)?;
        let mut off = 0u64;
        while off < len {
            let chunk = (len - off).min(MAX_VECS * PAGE);
            let pages = chunk.div_ceil(PAGE);
            // SAFETY: `fs_bio_set` is the block layer's general bio set;
            // the source is live; GFP_NOIO cannot recurse into it.
            let bio = unsafe {
                bindings::bio_alloc_bioset(
                    src.as_ptr(),
                    pages as u16,
                    bindings::req_op_REQ_OP_WRITE | bindings::REQ_SYNC | bindings::REQ_FUA,
                    bindings::GFP_NOIO,
                    ptr::addr_of_mut!(bindings::fs_bio_set),
                )
            };
            if bio.is_null() {
                return Err(ENOMEM);
            }
            // SAFETY: `bio` is ours; the pages outlive the synchronous
            // submission; the flag keeps our own hook from taking it.
            let r = unsafe {
                (*bio).bi_iter.bi_sector = off >> crate::region::SECTOR_SHIFT;
                io::set_filtered(bio);
                for i in 0..pages {
                    let page = if off == 0 && i == 0 {
                        &self.marker_page
                    } else {
                        &self.zero_page
                    };
                    let l = (chunk - i * PAGE).min(PAGE) as u32;
                    if bindings::bio_add_page(bio, page.as_ptr(), l, 0) != l as i32 {
                        bindings::bio_put(bio);
                        return Err(ENOMEM);
                    }
                }
                let r = bindings::submit_bio_wait(bio);
                bindings::bio_put(bio);
                r
            };
            kernel::error::to_result(r)?;
            off += chunk;
        }
        // SAFETY: The source is live.
        kernel::error::to_result(unsafe { bindings::blkdev_issue_flush(src.as_ptr()) })
    }
}

impl Filter for Migration {
    const NAME: &'static CStr = c_str!("blkmig");

    fn attach(source: &BlockDevice, opt: &[u8], holder: Holder) -> Result<Pin<KBox<Self>>> {
        let opts = Options::parse(opt)?;
        if opts.target == source.dev() {
            return Err(EXDEV);
        }
        let target = OpenDevice::open_exclusive(opts.target, holder)?;
        let t = target.bdev();
        if t.overlaps(source) {
            return Err(EXDEV);
        }
        let sectors = source.nr_sectors();
        if t.nr_sectors() < sectors {
            return Err(ENOSPC);
        }
        let region_bytes = 1u64 << opts.region_shift;
        for lbs in [source.logical_block_size(), t.logical_block_size()] {
            if lbs == 0 || region_bytes % u64::from(lbs) != 0 {
                return Err(EINVAL);
            }
        }
        let geometry = Geometry::new(sectors, opts.region_shift).map_err(|_| EINVAL)?;
        // GFP_KERNEL is fine: attach runs from the ioctl, outside any
        // filtered bio, with the source queue not frozen.
        let words = alloc_words(geometry.regions())?;
        let zeroed = flags::GFP_KERNEL | flags::__GFP_ZERO;
        let marker_page = Page::alloc_page(zeroed)?;
        let zero_page = Page::alloc_page(zeroed)?;
        let m = KBox::try_pin_init(
            try_pin_init!(Self {
                geometry,
                words,
                target,
                source: source.as_ptr(),
                hold_timeout_ms: opts.hold_timeout_ms,
                mode: AtomicU32::new(Mode::Clone as u32),
                failure: AtomicU32::new(abi::Failure::None as u32),
                failure_errno: AtomicI32::new(0),
                holding: AtomicBool::new(false),
                hold_deadline_ns: AtomicI64::new(0),
                hold_owner: AtomicI32::new(0),
                inflight_writes: AtomicU64::new(0),
                head_reads: AtomicU64::new(0),
                owned: AtomicU64::new(0),
                stats: Counters::default(),
                retire_failed: AtomicBool::new(false),
                marker_page,
                zero_page,
                ctx_set <- BioSet::new(POOL, io::CTX_PAD),
                plain_set <- BioSet::new(POOL, 0),
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
        // Let held writers go, so that detach's queue freeze is not kept
        // waiting for them.
        self.holding.store(false, Ordering::SeqCst);
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
            Some(c @ (CtlCmd::CopyBegin | CtlCmd::CopyEnd)) => self.copy(c, buf, len),
            Some(CtlCmd::SyncedMap) => self.synced_map(buf, len),
            Some(CtlCmd::HoldWrites) => {
                self.hold_writes(buf, *len)?;
                *len = 0;
                Ok(())
            }
            Some(CtlCmd::Switch) => {
                self.switch()?;
                *len = 0;
                Ok(())
            }
            Some(CtlCmd::Release) => {
                self.holding.store(false, Ordering::SeqCst);
                *len = 0;
                Ok(())
            }
            None => Err(EINVAL),
        }
    }

    fn submit_bio(&self, _source: &BlockDevice, bio: &Bio) -> bool {
        let mode = self.mode_raw();
        if mode == Mode::Failed as u32 {
            return false;
        }
        if mode == Mode::Redirect as u32 {
            return self.redirect(bio);
        }
        match bio.op() {
            Op::Read if mode == MODE_SWITCHING => self.redirect(bio),
            Op::Read => self.clone_read(bio),
            Op::Other => false,
            Op::Write | Op::Discard | Op::WriteZeroes => self.clone_write(bio),
        }
    }
}

#[pinned_drop]
impl PinnedDrop for Migration {
    fn drop(self: Pin<&mut Self>) {
        self.holding.store(false, Ordering::SeqCst);
        // Every bio we took or submitted must be finished before the target
        // is closed and the bio sets go away.
        while self.owned.load(Ordering::Acquire) != 0 {
            nap();
        }
        if self.mode_raw() == Mode::Redirect as u32 {
            // The source's page cache was filled from the target: drop it
            // before anything can read the retired source through it.
            // SAFETY: The source is valid until detach has returned.
            unsafe { bindings::invalidate_bdev(self.source) };
        }
        pr_info!("detached\n");
    }
}
