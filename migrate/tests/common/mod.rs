//! A blkmig filter simulated in process, over two image files: the region
//! protocol of the core crate (the same code the kernel module runs), the
//! write hold with its timer, the switch with its retire marker, redirect.
//! Tests send "filesystem" writes through [`SimFilter::write`] while the
//! real copier runs against it through the [`Tracker`] trait.

#![allow(dead_code)]

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use blkmig::core::abi::{self, CtlCmd, Mode, RegionOp, Status};
use blkmig::core::region::{Begin, End, Geometry, RegionMap, Regions, Verify};
use blkmig::filter::{FilterError, Request};
use blkmig::tracker::Tracker;

struct State {
    mode: Mode,
    holding: bool,
    /// Bumped by every hold, so a stale timer does not release a new hold.
    hold_gen: u64,
    inflight: u64,
    writes_held: u64,
    /// The region hold (COPY_BEGIN with `REGION_OP_HOLD`) and its deadline:
    /// the first to see it passed ends it, as the module's timer does.
    held_region: Option<(u64, Instant)>,
    /// When the current hold began, and its timeout.
    hold_since: Option<Instant>,
    hold_timeout: Duration,
    longest_hold: Duration,
}

impl State {
    /// Ends the hold (release, timer, switch, failure).
    fn end_hold(&mut self) {
        self.end_hold_within(Duration::MAX);
    }

    /// Ends the hold, which lasted at most `limit` (the timer's: a busy
    /// test machine may run this thread late, the kernel's timer is not).
    fn end_hold_within(&mut self, limit: Duration) {
        self.holding = false;
        if let Some(t) = self.hold_since.take() {
            self.longest_hold = self.longest_hold.max(t.elapsed().min(limit));
        }
    }
}

/// How long a region hold lasts at most (the module's: the attach-time
/// hold timeout, at most 1 s).
pub const SIM_REGION_HOLD: Duration = Duration::from_secs(1);

/// The simulated filter.
pub struct SimFilter {
    geo: Geometry,
    words: Vec<AtomicU64>,
    src: File,
    tgt: File,
    shared: Arc<(Mutex<State>, Condvar)>,
    conflicts: AtomicU64,
    busy: AtomicU64,
    mirrored: AtomicU64,
    /// Writes to the source, as the module counts them.
    seen: AtomicU64,
    /// The source's first region as it was when the switch overwrote it.
    pub head_at_switch: Mutex<Option<Vec<u8>>>,
    /// Longest time a write waited on the hold.
    pub longest_hold_wait: Mutex<Duration>,
    /// Holds so far.
    holds: AtomicU64,
    /// Region holds so far.
    pub region_holds: AtomicU64,
    /// Writes that waited in a region hold.
    pub region_writes_held: AtomicU64,
    /// Writes that touched the head and were not mirrored.
    pub head_writes: AtomicU64,
    /// How long the switch's flush and head read take, and then again its
    /// marker and the target's head: a switch that has not done the first
    /// by the hold's deadline is cancelled, and so is one whose second
    /// part would end past it; once begun, the second part is finished.
    pub switch_cost: Mutex<Duration>,
    /// How late the hold's timer releases the writes (a busy machine runs
    /// the module's work item late).
    pub timer_late: Mutex<Duration>,
    /// When the first hold began.
    pub first_hold_at: Mutex<Option<std::time::SystemTime>>,
    /// Called with the target file and the region after every committed
    /// copy: a target that changes what was written to it, behind the
    /// filter's back.
    pub after_commit: Mutex<Option<AfterCommit>>,
}

/// See [`SimFilter::after_commit`].
pub type AfterCommit = Box<dyn Fn(&File, u64) + Send + Sync>;

/// The simulation's attachment identity (the module's is random).
pub const SIM_MIGRATION_ID: u64 = 0x5eed_0000_0000_0001;

fn err(request: Request, errno: i32) -> FilterError {
    FilterError::Refused {
        path: "simulated".into(),
        request,
        errno,
    }
}

/// Deterministic, incompressible-looking bytes.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

impl SimFilter {
    /// A filter migrating `src` (of `bytes`) to `tgt`, regions of `1 << shift`.
    pub fn new(src: File, tgt: File, bytes: u64, shift: u32) -> Arc<Self> {
        let geo = Geometry::new(bytes >> 9, shift).unwrap_or_else(|e| panic!("{e:?}"));
        Arc::new(Self {
            geo,
            words: (0..geo.regions()).map(|_| AtomicU64::new(0)).collect(),
            src,
            tgt,
            shared: Arc::new((
                Mutex::new(State {
                    mode: Mode::Clone,
                    holding: false,
                    hold_gen: 0,
                    inflight: 0,
                    writes_held: 0,
                    held_region: None,
                    hold_since: None,
                    hold_timeout: Duration::ZERO,
                    longest_hold: Duration::ZERO,
                }),
                Condvar::new(),
            )),
            conflicts: AtomicU64::new(0),
            busy: AtomicU64::new(0),
            mirrored: AtomicU64::new(0),
            seen: AtomicU64::new(0),
            head_at_switch: Mutex::new(None),
            longest_hold_wait: Mutex::new(Duration::ZERO),
            holds: AtomicU64::new(0),
            region_holds: AtomicU64::new(0),
            region_writes_held: AtomicU64::new(0),
            head_writes: AtomicU64::new(0),
            after_commit: Mutex::new(None),
            switch_cost: Mutex::new(Duration::ZERO),
            timer_late: Mutex::new(Duration::ZERO),
            first_hold_at: Mutex::new(None),
        })
    }

    /// The longest hold so far, from HOLD_WRITES to its release, its timer
    /// or the switch: the longest any write could have waited.
    pub fn longest_hold(&self) -> Duration {
        self.lock().longest_hold
    }

    fn map(&self) -> RegionMap<'_> {
        RegionMap::new(&self.words)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.shared.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn notify(&self) {
        self.shared.1.notify_all();
    }

    fn wait<'a>(&self, g: std::sync::MutexGuard<'a, State>) -> std::sync::MutexGuard<'a, State> {
        self.shared.1.wait(g).unwrap_or_else(|e| e.into_inner())
    }

    /// Geometry of the device.
    pub fn geometry(&self) -> Geometry {
        self.geo
    }

    /// Current mode.
    pub fn mode(&self) -> Mode {
        self.lock().mode
    }

    /// A write from the "filesystem" at byte `off`, as the filter's
    /// submit_bio would see it. Blocks while writes are held.
    pub fn write(&self, off: u64, data: &[u8]) {
        self.write_as(off, data, false);
    }

    /// A write by the copier's own process (the page-cache writeback its
    /// reads force): the hold lets it through, as the module does.
    pub fn write_by_copier(&self, off: u64, data: &[u8]) {
        self.write_as(off, data, true);
    }

    fn write_as(&self, off: u64, data: &[u8], copier: bool) {
        let t0 = Instant::now();
        let regions = self
            .geo
            .regions_of(off >> 9, (data.len() as u64).div_ceil(512));
        self.seen.fetch_add(1, Ordering::Relaxed);
        let mut st = self.lock();
        let (mut in_hold, mut in_region) = (false, false);
        loop {
            if st.holding && !copier {
                if !in_hold {
                    in_hold = true;
                    st.writes_held += 1;
                }
                st = self.wait(st);
                continue;
            }
            // The region hold: writes to the held region wait for its
            // COPY_END (or its deadline); others pass.
            match st.held_region {
                Some((r, deadline)) if !copier && (regions.start..regions.end).contains(&r) => {
                    let now = Instant::now();
                    if now >= deadline {
                        st.held_region = None;
                        self.notify();
                        continue;
                    }
                    if !in_region {
                        in_region = true;
                        self.region_writes_held.fetch_add(1, Ordering::Relaxed);
                    }
                    st = self
                        .shared
                        .1
                        .wait_timeout(st, deadline - now)
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
                _ => break,
            }
        }
        if in_hold {
            st.writes_held -= 1;
            let waited = t0.elapsed();
            let mut l = self
                .longest_hold_wait
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            *l = (*l).max(waited);
        }
        if st.mode == Mode::Redirect {
            drop(st);
            self.tgt
                .write_all_at(data, off)
                .unwrap_or_else(|e| panic!("target write: {e}"));
            return;
        }
        let mut mirror = self.map().write_submit(regions) && st.mode == Mode::Clone;
        let (sector, sectors) = (off >> 9, (data.len() as u64).div_ceil(512));
        if self.geo.touches_head(sector, sectors) {
            // As the module: the target's head is the switch's alone. A
            // write within it needs nothing more; one that also reaches past
            // it sends its regions back to be copied.
            if !self.geo.within_head(sector, sectors) {
                (regions.start..regions.end).for_each(|r| self.map().unsync(r));
            }
            self.head_writes.fetch_add(1, Ordering::SeqCst);
            mirror = false;
        }
        st.inflight += 1;
        drop(st);
        self.src
            .write_all_at(data, off)
            .unwrap_or_else(|e| panic!("source write: {e}"));
        if mirror {
            self.tgt
                .write_all_at(data, off)
                .unwrap_or_else(|e| panic!("target write: {e}"));
            self.mirrored.fetch_add(1, Ordering::Relaxed);
        }
        self.map().write_complete(regions);
        let mut st = self.lock();
        st.inflight -= 1;
        self.notify();
    }
}

impl SimFilter {
    /// A write to `region` that is submitted and never completes (until
    /// [`SimFilter::end_stuck_write`]): the region stays busy.
    pub fn begin_stuck_write(&self, region: u64) {
        self.map().write_submit(Regions {
            start: region,
            end: region + 1,
        });
    }

    /// Completes the write of [`SimFilter::begin_stuck_write`].
    pub fn end_stuck_write(&self, region: u64) {
        self.map().write_complete(Regions {
            start: region,
            end: region + 1,
        });
        // A region hold's COPY_BEGIN may be waiting for it, as in the module.
        let _st = self.lock();
        self.notify();
    }

    /// The region the region hold holds now, if any (one whose deadline
    /// has passed is not held any more).
    pub fn held_region(&self) -> Option<u64> {
        self.lock()
            .held_region
            .filter(|&(_, deadline)| Instant::now() < deadline)
            .map(|(r, _)| r)
    }
}

impl SimFilter {
    /// Starts the region hold on `r`, as COPY_BEGIN with `REGION_OP_HOLD`
    /// does, and waits for the writes in flight to it. Returns whether it
    /// holds `r` (not inside a switch's hold, nor while another is held).
    fn hold_region(&self, r: u64) -> bool {
        let mut st = self.lock();
        // Nothing is held for a region that is synced or out of range.
        if st.mode != Mode::Clone
            || st.holding
            || st.held_region.is_some()
            || !matches!(self.map().copy_begin(r), Some(Begin::Busy | Begin::Copy(_)))
        {
            return false;
        }
        let deadline = Instant::now() + SIM_REGION_HOLD;
        st.held_region = Some((r, deadline));
        self.region_holds.fetch_add(1, Ordering::Relaxed);
        while blkmig::core::region::inflight(self.map().load(r)) > 0
            && st.held_region.is_some_and(|(h, _)| h == r)
        {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            st = self
                .shared
                .1
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        true
    }

    /// Ends the region hold if it holds `r`.
    fn release_region(&self, r: u64) {
        let mut st = self.lock();
        if st.held_region.is_some_and(|(h, _)| h == r) {
            st.held_region = None;
            self.notify();
        }
    }
}

/// The module's check of `RegionOp::flags`, made on every op before any
/// is acted on: `REGION_OP_HOLD` in COPY_BEGIN (never on a region of the
/// head) and in COPY_END (which takes the same array back), nothing
/// elsewhere; anything else makes the whole call `EINVAL`.
fn check_flags(geo: &Geometry, cmd: CtlCmd, ops: &[RegionOp]) -> Result<(), FilterError> {
    let ok = |o: &RegionOp| match o.flags {
        0 => true,
        abi::REGION_OP_HOLD => {
            cmd == CtlCmd::CopyEnd || (cmd == CtlCmd::CopyBegin && geo.head_len(o.region) == 0)
        }
        _ => false,
    };
    if !ops.iter().all(ok) {
        return Err(err(Request::Ctl(cmd), libc::EINVAL));
    }
    Ok(())
}

impl Tracker for SimFilter {
    fn status(&self) -> Result<Status, FilterError> {
        let st = self.lock();
        Ok(Status {
            version: abi::ABI_VERSION,
            mode: st.mode as u32,
            region_shift: self.geo.shift(),
            flags: if st.holding { abi::STATUS_HOLDING } else { 0 },
            source_sectors: self.geo.sectors(),
            target_sectors: self.geo.sectors(),
            regions_total: self.geo.regions(),
            regions_synced: self.map().synced_count(),
            copy_conflicts: self.conflicts.load(Ordering::Relaxed),
            copy_busy: self.busy.load(Ordering::Relaxed),
            writes_mirrored: self.mirrored.load(Ordering::Relaxed),
            writes_seen: self.seen.load(Ordering::Relaxed),
            writes_held: st.writes_held,
            migration_id: SIM_MIGRATION_ID,
            head_writes: self.head_writes.load(Ordering::SeqCst),
            holds: self.holds.load(Ordering::Relaxed),
            region_holds: self.region_holds.load(Ordering::Relaxed),
            region_writes_held: self.region_writes_held.load(Ordering::Relaxed),
            hold_longest_ns: self
                .longest_hold_wait
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .as_nanos() as u64,
            ..Status::default()
        })
    }

    fn copy_begin(&self, ops: &mut [RegionOp]) -> Result<(), FilterError> {
        check_flags(&self.geo, CtlCmd::CopyBegin, ops)?;
        if self.lock().mode != Mode::Clone {
            ops.iter_mut()
                .for_each(|o| o.result = abi::REGION_NOT_CLONING);
            return Ok(());
        }
        for o in ops {
            let held = o.flags & abi::REGION_OP_HOLD != 0 && self.hold_region(o.region);
            (o.word, o.result) = match self.map().copy_begin(o.region) {
                Some(Begin::Copy(w)) => (w, abi::REGION_OK),
                Some(Begin::Busy) => {
                    self.busy.fetch_add(1, Ordering::Relaxed);
                    (0, abi::REGION_BUSY)
                }
                Some(Begin::Synced) => (0, abi::REGION_SYNCED),
                None => (0, abi::REGION_RANGE),
            };
            if held && o.result != abi::REGION_OK {
                self.release_region(o.region);
            }
        }
        Ok(())
    }

    fn copy_end(&self, ops: &mut [RegionOp]) -> Result<(), FilterError> {
        check_flags(&self.geo, CtlCmd::CopyEnd, ops)?;
        let cloning = self.lock().mode == Mode::Clone;
        for o in ops {
            let end = if cloning {
                self.map().copy_end(o.region, o.word)
            } else {
                None
            };
            o.result = match end {
                _ if !cloning => abi::REGION_NOT_CLONING,
                Some(End::Committed) => {
                    if let Some(f) = &*self.after_commit.lock().unwrap_or_else(|e| e.into_inner()) {
                        f(&self.tgt, o.region);
                    }
                    abi::REGION_OK
                }
                Some(End::Conflict) => {
                    self.conflicts.fetch_add(1, Ordering::Relaxed);
                    abi::REGION_CONFLICT
                }
                None => abi::REGION_RANGE,
            };
            // After the commit, as the module, whatever the result: the
            // held writes are mirrored.
            self.release_region(o.region);
        }
        Ok(())
    }

    fn verify_begin(&self, ops: &mut [RegionOp]) -> Result<(), FilterError> {
        check_flags(&self.geo, CtlCmd::VerifyBegin, ops)?;
        let cloning = self.lock().mode == Mode::Clone;
        for o in ops {
            (o.word, o.result) = match self.map().verify_begin(o.region) {
                _ if !cloning => (0, abi::REGION_NOT_CLONING),
                Some(Verify::Compare(w)) => (w, abi::REGION_OK),
                Some(Verify::Busy) => (0, abi::REGION_BUSY),
                Some(Verify::NotSynced) => (0, abi::REGION_NOT_SYNCED),
                None => (0, abi::REGION_RANGE),
            };
        }
        Ok(())
    }

    fn verify_end(&self, ops: &mut [RegionOp]) -> Result<(), FilterError> {
        check_flags(&self.geo, CtlCmd::VerifyEnd, ops)?;
        for o in ops {
            o.result = match self.map().verify_end(o.region, o.word) {
                Some(true) => abi::REGION_OK,
                Some(false) => abi::REGION_CONFLICT,
                None => abi::REGION_RANGE,
            };
        }
        Ok(())
    }

    fn unsync(&self, ops: &mut [RegionOp]) -> Result<(), FilterError> {
        check_flags(&self.geo, CtlCmd::Unsync, ops)?;
        for o in ops {
            o.result = if o.region < self.geo.regions() {
                self.map().unsync(o.region);
                abi::REGION_OK
            } else {
                abi::REGION_RANGE
            };
        }
        Ok(())
    }

    fn synced(&self, first: u64, count: u64) -> Result<Vec<bool>, FilterError> {
        Ok((first..(first + count).min(self.geo.regions()))
            .map(|r| blkmig::core::region::is_synced(self.map().load(r)))
            .collect())
    }

    fn hold_writes(&self, timeout_ms: u32) -> Result<(), FilterError> {
        let timeout = Duration::from_millis(u64::from(timeout_ms));
        let deadline = Instant::now() + timeout;
        let mut st = self.lock();
        if st.mode != Mode::Clone {
            return Err(err(Request::Ctl(CtlCmd::HoldWrites), libc::EINVAL));
        }
        st.holding = true;
        // The switch's hold takes the region hold's writes over.
        st.held_region = None;
        self.notify();
        st.hold_since = Some(Instant::now());
        st.hold_timeout = timeout;
        st.hold_gen += 1;
        self.holds.fetch_add(1, Ordering::Relaxed);
        self.first_hold_at
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_or_insert_with(std::time::SystemTime::now);
        let gen = st.hold_gen;
        // The kernel's timer: release and cancel if the switch does not come
        // (its work item may run late).
        let shared = self.shared.clone();
        let fires = timeout + *self.timer_late.lock().unwrap_or_else(|e| e.into_inner());
        std::thread::spawn(move || {
            std::thread::sleep(fires);
            let mut st = shared.0.lock().unwrap_or_else(|e| e.into_inner());
            if st.holding && st.hold_gen == gen {
                st.end_hold_within(fires);
                shared.1.notify_all();
            }
        });
        while st.inflight > 0 {
            let now = Instant::now();
            if now >= deadline || !st.holding {
                st.end_hold();
                self.notify();
                return Err(err(Request::Ctl(CtlCmd::HoldWrites), libc::ETIMEDOUT));
            }
            st = self
                .shared
                .1
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        Ok(())
    }

    fn switch(&self, head_writes: u64) -> Result<(), FilterError> {
        let mut st = self.lock();
        if !st.holding {
            return Err(err(Request::Ctl(CtlCmd::Switch), libc::ETIMEDOUT));
        }
        if !self.map().all_synced() || head_writes != self.head_writes.load(Ordering::SeqCst) {
            return Err(err(Request::Ctl(CtlCmd::Switch), libc::EAGAIN));
        }
        let cost = *self.switch_cost.lock().unwrap_or_else(|e| e.into_inner());
        if !cost.is_zero() {
            // The flushes and head writes, with writes still held; the
            // hold's timer may fire meanwhile and cancel the switch.
            let gen = st.hold_gen;
            drop(st);
            std::thread::sleep(cost);
            st = self.lock();
            if !st.holding || st.hold_gen != gen {
                return Err(err(Request::Ctl(CtlCmd::Switch), libc::ETIMEDOUT));
            }
            // Past the deadline the kernel cancels the switch, whether or
            // not its timer has run yet.
            if st.hold_since.is_some_and(|t| t.elapsed() > st.hold_timeout) {
                let limit = st.hold_timeout;
                st.end_hold_within(limit);
                self.notify();
                return Err(err(Request::Ctl(CtlCmd::Switch), libc::ETIMEDOUT));
            }
            // The marker and the target's head cost about as much again,
            // and once begun they end past the deadline if they must: the
            // module begins them only if they should end by it.
            if st
                .hold_since
                .is_some_and(|t| t.elapsed() + cost > st.hold_timeout)
            {
                st.end_hold();
                self.notify();
                return Err(err(Request::Ctl(CtlCmd::Switch), libc::ETIMEDOUT));
            }
            drop(st);
            std::thread::sleep(cost);
            st = self.lock();
        }
        // Retire the source: marker + zeros over its head; then the
        // target's head, which nothing wrote before.
        let len = self.geo.head_bytes();
        let mut head = vec![0u8; len as usize];
        self.src
            .read_exact_at(&mut head, 0)
            .unwrap_or_else(|e| panic!("{e}"));
        *self
            .head_at_switch
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(head.clone());
        let mut marker = vec![0u8; len as usize];
        marker[..16].copy_from_slice(&abi::RETIRE_MAGIC);
        marker[48..56].copy_from_slice(&SIM_MIGRATION_ID.to_ne_bytes());
        marker[56..64].copy_from_slice(&len.to_ne_bytes());
        self.src
            .write_all_at(&marker, 0)
            .unwrap_or_else(|e| panic!("{e}"));
        self.tgt
            .write_all_at(&head, 0)
            .unwrap_or_else(|e| panic!("{e}"));
        st.mode = Mode::Redirect;
        st.end_hold();
        self.notify();
        Ok(())
    }

    fn release(&self) -> Result<(), FilterError> {
        let mut st = self.lock();
        st.end_hold();
        self.notify();
        Ok(())
    }
}

/// See [`SimFreeSpace::after_query`].
pub type AfterQuery = Box<dyn Fn((u64, u64)) + Send + Sync>;

/// A filesystem's free space, made up: byte ranges the "filesystem" does
/// not use, and a hook run right after each query (a block allocated and
/// written just after the copier asked).
#[derive(Default)]
pub struct SimFreeSpace {
    /// Free byte ranges, sorted and disjoint.
    pub free: Mutex<Vec<(u64, u64)>>,
    /// Queries answered.
    pub queries: AtomicU64,
    /// Settles asked for.
    pub settles: AtomicU64,
    /// Run after each query, with the span asked about.
    pub after_query: Mutex<Option<AfterQuery>>,
}

impl std::fmt::Debug for SimFreeSpace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimFreeSpace").finish_non_exhaustive()
    }
}

impl SimFreeSpace {
    /// A filesystem with `free` unused.
    pub fn new(free: Vec<(u64, u64)>) -> Arc<Self> {
        Arc::new(Self {
            free: Mutex::new(free),
            ..Self::default()
        })
    }

    /// The filesystem takes `span` into use.
    pub fn allocate(&self, (s, e): (u64, u64)) {
        let mut f = self.free.lock().unwrap_or_else(|e| e.into_inner());
        *f = f
            .iter()
            .flat_map(|&(a, b)| [(a, b.min(s)), (a.max(e), b)])
            .filter(|&(a, b)| a < b)
            .collect();
    }
}

impl blkmig::fsmap::FreeSpace for SimFreeSpace {
    fn free(&self, (s, e): (u64, u64)) -> std::io::Result<Vec<(u64, u64)>> {
        let out = self
            .free
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|&(a, b)| (a.max(s), b.min(e)))
            .filter(|&(a, b)| a < b)
            .collect();
        self.queries.fetch_add(1, Ordering::SeqCst);
        if let Some(h) = &*self.after_query.lock().unwrap_or_else(|e| e.into_inner()) {
            h((s, e));
        }
        Ok(out)
    }

    fn settle(&self) -> std::io::Result<()> {
        self.settles.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

/// Whether the root tier runs: only with `BLKMIG_ROOT_TESTS=1`, and then as
/// root (it fails rather than skips when it cannot do its work).
pub fn enabled() -> bool {
    if std::env::var("BLKMIG_ROOT_TESTS").as_deref() != Ok("1") {
        eprintln!("skipped: root tier (set BLKMIG_ROOT_TESTS=1, as root)");
        return false;
    }
    assert!(
        rustix::process::geteuid().is_root(),
        "BLKMIG_ROOT_TESTS=1 needs root"
    );
    true
}

/// Runs `cmd args`; it must succeed. Its standard output, trimmed.
pub fn run(cmd: &str, args: &[&str]) -> String {
    let o = std::process::Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(
        o.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).trim().to_owned()
}

/// docs/json.md, the documented shape of every JSON output.
pub fn json_doc() -> blkmig::jsondoc::Doc {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/json.md");
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    blkmig::jsondoc::Doc::parse(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// Checks `v` against the documented `kinds`; fails naming every problem.
pub fn check_json(kinds: &[&str], v: &serde_json::Value) {
    if let Err(p) = json_doc().check(kinds, v) {
        panic!("not as docs/json.md says: {p:#?}\nin {v}");
    }
}

/// Checks every line of `stdout` against the documented `kinds`; there
/// must be at least one.
pub fn check_json_lines(kinds: &[&str], stdout: &[u8]) -> Vec<serde_json::Value> {
    let text = String::from_utf8_lossy(stdout);
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(!lines.is_empty(), "no JSON line");
    for v in &lines {
        check_json(kinds, v);
    }
    lines
}
