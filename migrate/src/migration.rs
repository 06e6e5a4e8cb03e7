//! Live migration: the copier that drives the filter's region protocol,
//! converges under any write load, and switches when the estimated pause
//! fits the operator's budget.
//!
//! Rounds: each round asks the filter which regions are not yet synced,
//! decides whether to switch, and otherwise copies them in batches:
//! COPY_BEGIN for a batch, read the source and write the target for every
//! region the filter let us copy, COPY_END for the batch once all its
//! writes have completed. `queue_depth` copies run at all times on the
//! blocking pool: the next batch is begun while the last copies of the
//! current one complete. Regions that were busy or raced a write stay
//! unsynced and come back in the next round.
//!
//! A region whose copy was raced or found busy [`HOT_RACES`] times is hot:
//! it is written faster than a copy takes. From then on it is copied on its
//! own, with the module's region hold (`REGION_OP_HOLD`): writes to that
//! region wait from its COPY_BEGIN to its COPY_END, so the copy commits and
//! every later write is mirrored; writes elsewhere go on. The rate limit is
//! paced before the hold, so a write waits for one region's read and write
//! at most.
//!
//! The target's head (its first `Geometry::head_bytes`, 128 KiB: the
//! superblocks, partition tables and labels found at a device's start) is
//! wiped at the start and never written here: the module writes it in the
//! switch, after the retire marker is on the source, so a half-copied
//! target is never recognisable as the filesystem. The rest of the first
//! region is copied ahead like any region. The last region (a GPT's backup,
//! an md 1.0 superblock) is wiped too and copied only inside the switch
//! window.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use blkmig_core::abi::{self, Mode, RegionOp, Status};
use blkmig_core::region::Geometry;
use governor::DefaultDirectRateLimiter;

use crate::buffer::AlignedBuf;
use crate::device::Device;
use crate::error::Error;
use crate::filter::FilterError;
use crate::fsmap::FreeSpace;
use crate::progress::Progress;
use crate::tracker::Tracker;
use crate::units::Bytes;
use crate::verify::{Bufs, ComparePolicy, Transfer, Verifier};

/// Shortest and longest wait between rounds in which nothing committed.
const IDLE_MIN: Duration = Duration::from_millis(5);
/// See [`IDLE_MIN`].
const IDLE_MAX: Duration = Duration::from_millis(250);
/// Regions copied before the measured rate is trusted to refuse a pause
/// budget.
const RATE_SAMPLE_REGIONS: u64 = 16;
/// Races (conflicts at COPY_END, busy at COPY_BEGIN) after which a region
/// is copied with the module's region hold.
const HOT_RACES: u32 = 3;
/// Held copies of a region that found it busy or would have waited for
/// writeback before it is left to the switch window (until it commits).
const HOLD_STRIKES: u32 = 3;
/// Switch attempts in a row that may run out of the pause budget before
/// the migration says that the budget cannot be met.
const OVER_BUDGET_ATTEMPTS: u32 = 5;

/// How long the copy stays at its busy depth after the last write to the
/// source was seen.
const BUSY_LINGER: Duration = Duration::from_millis(250);
/// How often the copier reads the source's write count.
const BUSY_SAMPLE: Duration = Duration::from_millis(50);
/// Copies kept running while the source is written, by default.
pub const BUSY_QUEUE_DEPTH: usize = 2;

/// How to run a migration.
#[derive(Clone, Debug)]
pub struct MigrateOptions {
    /// Regions copied at once while nothing writes to the source.
    pub queue_depth: usize,
    /// Regions copied at once while something writes to the source (at
    /// most `queue_depth`): the workload's I/O waits behind fewer copies
    /// at each device.
    pub busy_queue_depth: usize,
    /// Copier limit in bytes per second.
    pub rate_limit: Option<Bytes>,
    /// A limit shared with other migrations running at once (`migrate
    /// rebalance`'s total), paced after `rate_limit`.
    pub shared_limit: Option<Arc<DefaultDirectRateLimiter>>,
    /// Switch only when the estimated pause is at most this.
    pub max_pause: Duration,
    /// Copy and keep mirroring, but do not switch.
    pub no_switch: bool,
    /// How long the filter may hold writes for one switch attempt, in ms.
    pub hold_timeout_ms: u32,
    /// Where the source's first region is saved before the switch.
    pub state_dir: PathBuf,
    /// Compare before copying, and commit without a write what the target
    /// already holds (a resumed migration), while comparisons find matches.
    pub compare: bool,
    /// Before the switch, compare every region on both devices; copy again
    /// what differs, and fail rather than switch over a region that differs
    /// twice.
    pub verify: bool,
    /// The free space of the filesystem on the source: regions it does not
    /// use are committed without a copy. `None` copies everything (a raw
    /// volume, or `--full-copy`).
    pub free_space: Option<Arc<dyn FreeSpace>>,
}

/// What a migration did.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Summary {
    /// Bytes the copier read from the source and wrote to the target.
    pub bytes_copied: u64,
    /// Bytes compared on both devices before a copy (a resumed migration).
    pub bytes_compared: u64,
    /// Bytes of regions committed by such a comparison, without a write.
    pub bytes_matched: u64,
    /// Bytes of regions committed without a copy because the filesystem on
    /// the source did not use them (its free space).
    pub bytes_skipped_free: u64,
    /// Bytes of all-zero regions zeroed on the target (write-zeroes)
    /// instead of written.
    pub bytes_zeroed: u64,
    /// Regions in all.
    pub regions: u64,
    /// Copies thrown away because a write raced them.
    pub recopies: u64,
    /// Copy attempts refused because a write was in flight.
    pub busy: u64,
    /// Rounds over the unsynced regions.
    pub rounds: u64,
    /// Switch attempts that did not complete.
    pub failed_switches: u64,
    /// Write holds the kernel made for this migration (switch attempts
    /// that held writes, failed ones and earlier runs' included).
    pub holds: u64,
    /// Region holds the kernel made for this migration (hot regions copied
    /// with the writes to them held, earlier runs' included).
    pub region_holds: u64,
    /// The longest time one write waited in a region hold (ms), as the
    /// kernel measured it; `None` if none did.
    pub region_hold_ms: Option<f64>,
    /// The longest time one write waited in a hold (ms), failed attempts
    /// included, as the kernel measured it; `None` if no write was held.
    pub pause_ms: Option<f64>,
    /// How long the switch that completed kept its window open, from the
    /// hold to the switch, as the copier timed it (ms).
    pub switch_window_ms: Option<f64>,
    /// Estimated pause when the switch was decided (ms).
    pub estimated_pause_ms: Option<f64>,
    /// Whether the filter is now in REDIRECT mode.
    pub switched: bool,
    /// Seconds from start to end.
    pub seconds: f64,
    /// Where the source's first region was saved.
    pub saved_head: Option<PathBuf>,
    /// `--verify`: regions whose last copy was compared on both devices
    /// and found the same (all of them when the migration switched).
    pub regions_verified: u64,
    /// `--verify`: regions written so continuously that no comparison of
    /// them held (each left after several passes; never one that differed).
    pub regions_unverified: u64,
    /// `--verify`: bytes of the comparisons that found them the same.
    pub bytes_verified: u64,
    /// `--verify`: comparisons a write made void (made again).
    pub verify_conflicts: u64,
    /// `--verify`: comparisons that found the target different (each such
    /// region was copied again).
    pub verify_mismatches: u64,
    /// `--verify`: the regions that differed.
    pub mismatched_regions: Vec<u64>,
}

impl Summary {
    /// The pause in words: the longest hold the kernel enforced, the holds
    /// and failed attempts, and the copier's own timing of the window.
    pub fn pause_text(&self) -> String {
        let mut t = match self.pause_ms {
            Some(p) => format!(
                "writes paused {p:.1} ms at the longest ({} holds, {} failed switch attempts)",
                self.holds, self.failed_switches
            ),
            None if self.switched => "no write was held".to_owned(),
            None => "no switch yet".to_owned(),
        };
        if let Some(w) = self.switch_window_ms {
            t += &format!("; the switch window lasted {w:.1} ms");
        }
        if self.region_holds > 0 {
            t += &format!("; {} region holds", self.region_holds);
            if let Some(r) = self.region_hold_ms {
                t += &format!(", a write waited {r:.1} ms in one at the longest");
            }
        }
        t
    }
}

/// Why a migration stopped or could not start. One type for the migration
/// layer: device errors (including an interruption) and filter errors are
/// its sources.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// Device I/O, a refusal of a device, or an interruption (Ctrl-C).
    #[error(transparent)]
    Device(#[from] Error),
    /// The filter refused a request.
    #[error(transparent)]
    Filter(FilterError),
    /// The filter went away: someone ran `migrate abort` or `detach`.
    #[error("the migration was aborted elsewhere: blkmig is no longer attached to the source (migrate abort or detach); the source is untouched")]
    Aborted,
    /// The filter reports FAILED.
    #[error(
        "the migration failed in the kernel: {0}; the source is intact, abort with `migrate abort`"
    )]
    Failed(String),
    /// The filter is not in CLONE mode when it should be.
    #[error("the filter is in {0} mode")]
    WrongMode(&'static str),
    /// The state directory could not be written.
    #[error("cannot save the source's first region to {path}", path = .path.display())]
    State {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The source is being migrated to another device than the one asked.
    #[error("{source_path} is already being migrated to device {major}:{minor}, not to {target}",
        source_path = .source_path.display(), target = .target.display())]
    OtherTarget {
        /// The source.
        source_path: PathBuf,
        /// The target asked for.
        target: PathBuf,
        /// The attached target's major number.
        major: u32,
        /// The attached target's minor number.
        minor: u32,
    },
    /// `abort` after the switch: there is nothing to abort.
    #[error("{source_path} has already switched to its target: there is nothing to abort (unmount it, then `migrate detach`)",
        source_path = .source_path.display())]
    AlreadySwitched {
        /// The source.
        source_path: PathBuf,
    },
    /// Interrupted (Ctrl-C): the migration was abandoned and blkmig
    /// detached.
    #[error("interrupted: the migration was abandoned, blkmig detached; {source_path} is untouched and in use as before",
        source_path = .source_path.display())]
    Abandoned {
        /// The source.
        source_path: PathBuf,
    },
    /// The copier's own I/O failed (a target that went away, a source
    /// read error) before the switch: the source holds the filesystem.
    #[error("the copy stopped before the switch, {source_path} is intact and still holds the filesystem{hint}",
        source_path = .source_path.display(),
        hint = if *.attached {
            format!(" (blkmig stays attached and mirroring: run `migrate start` again to resume once the devices work, or `migrate abort {}`)", .source_path.display())
        } else {
            String::new()
        })]
    Stopped {
        /// The source.
        source_path: PathBuf,
        /// Whether blkmig is still attached in CLONE.
        attached: bool,
        /// The failure.
        #[source]
        cause: Error,
    },
    /// The switch window can never fit the pause budget: it copies the
    /// last region with writes held, and has work of its own.
    #[error("--max-pause {budget_ms} ms cannot be met: the switch copies the last region ({window}) with writes held and spends about {fixed_ms:.0} ms on its own work, in all about {need_ms:.0} ms at the measured {rate}/s; use --max-pause {suggest_ms}ms or more (or attach with a smaller --region-size). blkmig stays attached and mirroring: rerun `migrate start` to resume",
        window = Bytes(*.window_bytes), rate = Bytes(*.rate_bytes_per_sec as u64))]
    PauseUnreachable {
        /// The operator's budget, ms.
        budget_ms: u128,
        /// Bytes the switch window must copy.
        window_bytes: u64,
        /// The measured copy rate.
        rate_bytes_per_sec: f64,
        /// The window's own work besides copying, ms.
        fixed_ms: f64,
        /// The estimated window, ms.
        need_ms: f64,
        /// A budget that would do, ms.
        suggest_ms: u64,
    },
    /// Switch attempts in a row ran out of the pause budget: the hold's
    /// timer released the writes each time before the switch was done.
    #[error("--max-pause {budget_ms} ms cannot be met here: {attempts} switch attempts in a row ran out of it (the writes were released each time and nothing changed); the window took about {fixed_ms:.0} ms besides copying (saving the head, flushing both devices, the retire marker, the target's head). blkmig stays attached and mirroring: rerun `migrate start` with --max-pause {suggest_ms}ms or more to resume, or `migrate abort` the source")]
    SwitchOverBudget {
        /// The operator's budget, ms.
        budget_ms: u128,
        /// Attempts that ran out of it.
        attempts: u32,
        /// What the window took besides copying, at the last attempt, ms.
        fixed_ms: f64,
        /// A budget that would do, ms.
        suggest_ms: u64,
    },
}

impl MigrateError {
    /// Whether the migration stopped because it was cancelled (Ctrl-C).
    pub fn is_interrupted(&self) -> bool {
        matches!(self, MigrateError::Device(Error::Interrupted))
    }
}

impl From<FilterError> for MigrateError {
    fn from(e: FilterError) -> Self {
        match e {
            FilterError::Refused {
                errno: libc::ENOENT,
                ..
            } => MigrateError::Aborted,
            e => MigrateError::Filter(e),
        }
    }
}

/// A mode number as a word.
pub fn mode_name(m: u32) -> &'static str {
    match Mode::from_raw(m) {
        Some(Mode::Clone) => "clone",
        Some(Mode::Redirect) => "redirect",
        Some(Mode::Failed) => "failed",
        None => "unknown",
    }
}

/// The failure a status reports, in words.
pub fn failure_text(st: &Status) -> String {
    let what = match abi::Failure::from_raw(st.failure) {
        Some(abi::Failure::None) => "no failure",
        Some(abi::Failure::TargetWrite) => "a write to the target failed",
        Some(abi::Failure::TargetFlush) => "a flush of the target failed",
        Some(abi::Failure::TargetGone) => "the target went away",
        Some(abi::Failure::SourceResized) => {
            "the source changed size while it was cloned (its new sectors were not tracked)"
        }
        Some(abi::Failure::PartialWrite) => {
            "a write reached part of the source's sectors through its whole disk or an overlapping partition"
        }
        Some(abi::Failure::TooManyWrites) => "too many writes in flight to count",
        Some(abi::Failure::NoMemory) => "a mirrored write could not be allocated",
        Some(abi::Failure::SourceRead) => "the switch could not read the source's first region",
        None => "unknown failure",
    };
    if st.failure_errno != 0 {
        format!(
            "{what} ({})",
            std::io::Error::from_raw_os_error(st.failure_errno)
        )
    } else {
        what.to_owned()
    }
}

/// The file the source's first region is saved in.
pub fn head_path(state_dir: &Path, src: &Device) -> PathBuf {
    crate::recover::source_dir(state_dir, src.id()).join(crate::recover::HEAD_FILE)
}

/// One live migration, from CLONE to REDIRECT.
pub struct Migration {
    tracker: Arc<dyn Tracker>,
    src: Arc<Device>,
    tgt: Arc<Device>,
    geo: Geometry,
    opts: MigrateOptions,
    progress: Arc<Progress>,
    cancel: Arc<AtomicBool>,
    /// The copier's own limit and the shared one, if any.
    limits: Vec<Arc<DefaultDirectRateLimiter>>,
    align: usize,
    /// Length of a copy buffer: a region, or the device if it is smaller.
    buf_len: usize,
    summary: Summary,
    /// Bytes copied and seconds spent copying, for the rate estimate.
    copy_bytes: u64,
    copy_secs: f64,
    /// Inside the switch window: no rate limit.
    in_window: bool,
    /// Smallest number of unsynced regions seen, and the round it was seen.
    best: (u64, u64),
    /// Whether the operator was told that the migration does not converge.
    told_stalled: bool,
    /// When to compare before copying.
    policy: ComparePolicy,
    /// `--verify`: the regions still to compare.
    verifier: Option<Verifier>,
    /// The attachment (written into the retire marker).
    migration_id: u64,
    /// Whether the free-space query failed once (then the copier copies
    /// everything).
    free_failed: bool,
    /// Races per region (see [`HOT_RACES`]).
    raced: std::collections::HashMap<u64, u32>,
    /// Held copies per hot region that found it busy (its writes did not
    /// drain in time) or would have waited for the writeback of cached
    /// pages: at [`HOLD_STRIKES`] it is left to the switch window, until it
    /// commits.
    hold_strikes: std::collections::HashMap<u64, u32>,
    /// The source's head, read and saved ahead of a hold: the count of
    /// writes to the head the module had seen when that read began.
    staged_head: Option<u64>,
    /// What a switch window takes besides copying (s): measured by the
    /// last attempt, else estimated from the head's staging.
    window_fixed: Option<f64>,
    /// Time spent copying and comparing in the current window (s).
    window_copy: f64,
    /// Switch attempts in a row that ran out of the budget.
    over_budget: u32,
    /// How late (ms) the hold's timer released writes in an attempt that
    /// ran out of the budget: the module's longest hold past the timeout.
    timer_late_ms: u32,
    /// How long (ms) the flushes of both devices just before the last hold
    /// took: the switch's last writes (the retire marker and the target's
    /// head, each durable before the next) cost about as much, and the
    /// module, which begins them only if they should end by the hold's
    /// deadline, finishes them past it if they take longer.
    flush_ms: u32,
    /// Set when the module cancelled the last switch for want of time:
    /// how long that switch request took (s).
    switch_ran_out: Option<f64>,
    /// How many copies to keep running.
    depth: Depth,
}

/// The number of copies the copier keeps running: its queue depth while
/// nothing writes to the source, its busy depth while something does (a
/// write seen in the last [`BUSY_LINGER`]), so that a workload's I/O does
/// not queue behind a full queue of region copies at each device.
#[derive(Debug)]
struct Depth {
    full: usize,
    busy: usize,
    /// When the source's write count was last read, and what it was.
    sampled: Option<(Instant, u64)>,
    busy_until: Option<Instant>,
}

impl Depth {
    fn new(full: usize, busy: usize) -> Self {
        Self {
            full: full.max(1),
            busy: busy.clamp(1, full.max(1)),
            sampled: None,
            busy_until: None,
        }
    }

    /// Whether the write count is due to be read again.
    fn due(&self, now: Instant) -> bool {
        self.sampled
            .is_none_or(|(t, _)| now.saturating_duration_since(t) >= BUSY_SAMPLE)
    }

    /// The module's count of writes seen on the source, read at `now`.
    fn observe(&mut self, now: Instant, writes: u64) {
        if self.sampled.is_some_and(|(_, before)| writes != before) {
            self.busy_until = Some(now + BUSY_LINGER);
        }
        self.sampled = Some((now, writes));
    }

    fn get(&self, now: Instant) -> usize {
        if self.busy_until.is_some_and(|t| now < t) {
            self.busy
        } else {
            self.full
        }
    }
}

/// A batch of regions under way in [`Migration::copy_all`]: begun by one
/// COPY_BEGIN, ended by one COPY_END once every copy in it has completed.
struct Batch {
    /// The ops as COPY_BEGIN returned them.
    ops: Vec<RegionOp>,
    /// Whether its regions are compared before they are written.
    compare: bool,
    /// The ops to copy (indices into `ops`), in order; those before `next`
    /// are started.
    todo: Vec<usize>,
    next: usize,
    /// Copies started and not completed.
    running: usize,
    /// What was done to each op done so far (index into `ops`).
    done: Vec<(usize, Transfer)>,
    /// Whether its COPY_END was sent.
    ended: bool,
}

impl Batch {
    /// Whether a copy of it is still to start.
    fn has_todo(&self) -> bool {
        self.next < self.todo.len()
    }

    /// Whether it can be ended: every copy started and completed.
    fn complete(&self) -> bool {
        !self.ended && !self.has_todo() && self.running == 0
    }
}

/// What a copy task hands back: its batch and op, its buffers, what it did.
type CopyDone = (usize, usize, Bufs, Result<Transfer, Error>);

impl Migration {
    /// A migration over an attached filter; `status` is its current status.
    pub fn new(
        tracker: Arc<dyn Tracker>,
        src: Arc<Device>,
        tgt: Arc<Device>,
        status: &Status,
        opts: MigrateOptions,
        progress: Arc<Progress>,
        cancel: Arc<AtomicBool>,
    ) -> Result<Self, MigrateError> {
        let geo = Geometry::new(status.source_sectors, status.region_shift).map_err(|_| {
            Error::RegionSize {
                region: Bytes(1u64 << status.region_shift.min(63)),
                block: src.block_size(),
            }
        })?;
        let limits = crate::copy::limiter(opts.rate_limit, geo.region_bytes())
            .into_iter()
            .chain(opts.shared_limit.clone())
            .collect();
        let align = src.mem_align().max(tgt.mem_align());
        let plan = crate::buffer::plan(
            geo.region_bytes(),
            geo.bytes(),
            geo.regions(),
            opts.queue_depth,
            crate::buffer::mem_available(),
        )?;
        let opts = MigrateOptions {
            queue_depth: plan.depth,
            ..opts
        };
        Ok(Self {
            buf_len: plan.len,
            tracker,
            src,
            tgt,
            geo,
            summary: Summary {
                regions: geo.regions(),
                ..Summary::default()
            },
            progress,
            cancel,
            limits,
            align,
            copy_bytes: 0,
            copy_secs: 0.0,
            in_window: false,
            depth: Depth::new(opts.queue_depth, opts.busy_queue_depth),
            best: (u64::MAX, 0),
            told_stalled: false,
            policy: ComparePolicy::new(opts.compare),
            verifier: opts.verify.then(|| Verifier::new(geo.regions())),
            opts,
            migration_id: status.migration_id,
            free_failed: false,
            raced: std::collections::HashMap::new(),
            hold_strikes: std::collections::HashMap::new(),
            staged_head: None,
            window_fixed: None,
            window_copy: 0.0,
            over_budget: 0,
            switch_ran_out: None,
            timer_late_ms: 0,
            flush_ms: 0,
        })
    }

    /// The last region, which only the switch window copies.
    fn boundary(&self, r: u64) -> bool {
        r + 1 == self.geo.regions()
    }

    fn check_mode(&self) -> Result<Status, MigrateError> {
        let st = self.tracker.status()?;
        match Mode::from_raw(st.mode) {
            Some(Mode::Clone) => Ok(st),
            Some(Mode::Failed) => Err(MigrateError::Failed(failure_text(&st))),
            Some(Mode::Redirect) => Err(MigrateError::WrongMode("redirect")),
            None => Err(MigrateError::WrongMode("unknown")),
        }
    }

    /// Regions not yet synced.
    fn unsynced(&self) -> Result<Vec<u64>, MigrateError> {
        let bits = self.tracker.synced(0, self.geo.regions())?;
        let list: Vec<u64> = (0..self.geo.regions())
            .filter(|&r| !bits.get(r as usize).copied().unwrap_or(false))
            .collect();
        self.progress.set_unsynced(list.len() as u64);
        let synced = self.geo.regions() - list.len() as u64;
        self.progress
            .set((synced * self.geo.region_bytes()).min(self.geo.bytes()));
        Ok(list)
    }

    fn bytes_of(&self, regions: &[u64]) -> u64 {
        regions
            .iter()
            .filter_map(|&r| self.geo.region_span(r))
            .map(|(_, n)| n)
            .sum()
    }

    /// Copier throughput so far, bytes per second (None before any copy).
    fn rate(&self) -> Option<f64> {
        (self.copy_secs > 0.0 && self.copy_bytes > 0)
            .then(|| self.copy_bytes as f64 / self.copy_secs)
    }

    /// Zeroes the target's head (only the switch writes it, after the
    /// retire marker, so that both devices are never recognisable at once)
    /// and its last region unless it is in sync: a copier that died inside
    /// the switch window after committing it left it SYNCED, every write to
    /// it has been mirrored since, and nothing would copy it again.
    pub async fn wipe_boundaries(&self) -> Result<(), MigrateError> {
        let mut rs = self.boundaries();
        let unsynced = self.unsynced()?;
        rs.retain(|r| unsynced.contains(r));
        // The head first, whatever is in sync: nothing else ever blanks it
        // before the switch writes it (it may span many small regions).
        let spans = std::iter::once((0, self.geo.head_bytes()))
            .chain(rs.into_iter().filter_map(|r| self.geo.region_span(r)));
        for (off, len) in spans {
            let tgt = self.tgt.clone();
            let align = self.align;
            tokio::task::spawn_blocking(move || {
                let zeros = AlignedBuf::new(align, len as usize);
                tgt.write_all_at(&zeros, off)
            })
            .await
            .map_err(|e| Error::joined(&e, "wipe"))??;
        }
        Ok(())
    }

    /// Counts the ops COPY_BEGIN found busy; an op refused because the
    /// filter is not cloning any more ends the copy.
    fn count_refused(&mut self, ops: &[RegionOp]) -> Result<(), MigrateError> {
        for o in ops {
            if o.result == abi::REGION_BUSY {
                self.summary.busy += 1;
                *self.raced.entry(o.region).or_default() += 1;
            } else if o.result == abi::REGION_NOT_CLONING {
                return Err(MigrateError::WrongMode("not clone"));
            }
        }
        Ok(())
    }

    /// COPY_BEGIN for `regions`: their ops, with the words to commit.
    fn copy_begin(&self, regions: &[u64]) -> Result<Vec<RegionOp>, MigrateError> {
        let mut ops: Vec<RegionOp> = regions
            .iter()
            .map(|&r| RegionOp {
                region: r,
                ..RegionOp::default()
            })
            .collect();
        self.tracker.copy_begin(&mut ops)?;
        Ok(ops)
    }

    /// Begins a batch of `regions`: COPY_BEGIN, then the free-space query
    /// that counts for it; the regions it lets through and the filesystem
    /// uses are to copy, the free ones are done.
    async fn begin_batch(&mut self, regions: &[u64]) -> Result<Batch, MigrateError> {
        let ops = self.copy_begin(regions)?;
        // Strictly after COPY_BEGIN: a block the filesystem allocates after
        // this query is written after it, which voids the region's commit
        // (or, after the commit, is mirrored).
        let free = self.free_regions(&ops).await;
        // Compare first where the target may already hold the data; never
        // in the switch window, whose copies must be quick.
        let compare = !self.in_window && self.policy.next_batch();
        let mut todo = Vec::new();
        let mut done = Vec::new();
        for (i, o) in ops.iter().enumerate() {
            if o.result != abi::REGION_OK {
                continue;
            }
            if free.contains(&i) {
                let past_head = self
                    .geo
                    .copy_range(o.region)
                    .map_or(0, |(from, to)| to - from);
                done.push((i, Transfer::Free(past_head)));
            } else if self.geo.region_span(o.region).is_some() {
                todo.push(i);
            }
        }
        Ok(Batch {
            ops,
            compare,
            todo,
            next: 0,
            running: 0,
            done,
            ended: false,
        })
    }

    /// Ends `batch`, every copy of which has completed: COPY_END for what
    /// it did, and the counts. Returns how many regions committed.
    fn end_batch(&mut self, batch: &mut Batch) -> Result<u64, MigrateError> {
        batch.ended = true;
        let copied = std::mem::take(&mut batch.done);
        // Work for the rate: the bytes of each region done, copied or
        // compared (a comparison reads as much as a copy moves).
        let (mut bytes, mut written, mut compared, mut same, mut differ) = (0, 0, 0, 0, 0);
        for &(_, t) in &copied {
            match t {
                Transfer::Written(w) => (bytes, written) = (bytes + w, written + w),
                Transfer::Matched(c) => {
                    (bytes, compared, same) = (bytes + c, compared + c, same + 1)
                }
                Transfer::Rewritten(c, w) => {
                    (bytes, written, compared, differ) =
                        (bytes + w, written + w, compared + c, differ + 1)
                }
                // Read, and zeroed: as much copy work as a write.
                Transfer::Zeroed(z) => bytes += z,
                Transfer::Free(_) => {}
            }
        }
        if batch.compare {
            self.policy.record(same, differ);
        }
        self.copy_bytes += bytes;
        self.summary.bytes_copied += written;
        self.summary.bytes_compared += compared;
        self.progress.add_work(bytes);
        let mut ends: Vec<RegionOp> = copied.iter().map(|&(i, _)| batch.ops[i]).collect();
        if !ends.is_empty() {
            self.tracker.copy_end(&mut ends)?;
        }
        let mut committed = 0;
        for (e, &(_, t)) in ends.iter().zip(&copied) {
            if e.result == abi::REGION_OK {
                committed += 1;
                // A region unsynced later starts counting its races anew.
                self.raced.remove(&e.region);
                self.hold_strikes.remove(&e.region);
                let n = self.geo.region_span(e.region).map_or(0, |(_, n)| n);
                self.progress.region_committed(n);
                match t {
                    Transfer::Matched(c) => self.summary.bytes_matched += c,
                    Transfer::Zeroed(z) => self.summary.bytes_zeroed += z,
                    Transfer::Free(f) => {
                        self.summary.bytes_skipped_free += f;
                        self.progress.add_skipped(f);
                    }
                    Transfer::Written(_) | Transfer::Rewritten(..) => {}
                }
                if let Some(v) = &mut self.verifier {
                    match t {
                        Transfer::Matched(c) => v.matched(e.region, c),
                        Transfer::Free(_) => v.skipped(e.region),
                        _ => v.copied(e.region),
                    }
                }
            }
            if e.result == abi::REGION_CONFLICT {
                self.summary.recopies += 1;
                self.progress.add_recopy();
                *self.raced.entry(e.region).or_default() += 1;
            }
        }
        self.count_refused(&batch.ops)?;
        Ok(committed)
    }

    /// Commits without a copy the regions of `regions` that the
    /// filesystem does not use: those a query made now says are free are
    /// taken in batches of up to [`abi::REGION_OPS_MAX`], each under the
    /// copy protocol (COPY_BEGIN, the query that counts, settle,
    /// COPY_END). Returns how many committed.
    async fn skip_free(&mut self, regions: &[u64]) -> Result<u64, MigrateError> {
        let Some(fs) = self.opts.free_space.clone() else {
            return Ok(0);
        };
        if self.in_window || self.free_failed {
            return Ok(0);
        }
        let (geo, bytes) = (self.geo, self.geo.bytes());
        let regions = regions.to_vec();
        // Which regions to try: a guess, made before COPY_BEGIN, so it
        // decides nothing.
        let guess = tokio::task::spawn_blocking(move || -> std::io::Result<Vec<u64>> {
            let free = fs.free((0, bytes))?;
            Ok(regions
                .into_iter()
                .filter(|&r| {
                    geo.copy_range(r)
                        .is_some_and(|range| crate::fsmap::covers(&free, range))
                })
                .collect())
        })
        .await;
        let candidates = match guess {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "cannot read the filesystem's free space; copying every region");
                self.free_failed = true;
                return Ok(0);
            }
            Err(e) => return Err(Error::joined(&e, "free space").into()),
        };
        let mut committed = 0;
        for chunk in candidates.chunks(abi::REGION_OPS_MAX as usize) {
            if self.cancel.load(Ordering::Relaxed) {
                return Err(Error::Interrupted.into());
            }
            let ops = self.copy_begin(chunk)?;
            let free = self.free_regions(&ops).await;
            let mut ends: Vec<RegionOp> = free.iter().map(|&i| ops[i]).collect();
            if !ends.is_empty() {
                self.tracker.copy_end(&mut ends)?;
            }
            for e in &ends {
                let Some((_, len)) = self.geo.region_span(e.region) else {
                    continue;
                };
                if e.result == abi::REGION_OK {
                    let f = self
                        .geo
                        .copy_range(e.region)
                        .map_or(0, |(from, to)| to - from);
                    committed += 1;
                    self.progress.region_committed(len);
                    self.summary.bytes_skipped_free += f;
                    self.progress.add_skipped(f);
                    if let Some(v) = &mut self.verifier {
                        v.skipped(e.region);
                    }
                } else if e.result == abi::REGION_CONFLICT {
                    self.summary.recopies += 1;
                    self.progress.add_recopy();
                }
            }
            self.count_refused(&ops)?;
        }
        Ok(committed)
    }

    /// The ops of `ops` (indices) that COPY_BEGIN let through and whose
    /// region, the head excepted, the filesystem does not use at all, per a
    /// query made now; empty without a free-space source, in the switch
    /// window, or if the query fails (then everything is copied, and the
    /// copier stops asking). When a region is free, the filesystem's
    /// free-space changes are made durable before returning (see
    /// [`FreeSpace::settle`]).
    async fn free_regions(&mut self, ops: &[RegionOp]) -> Vec<usize> {
        let Some(fs) = self.opts.free_space.clone() else {
            return Vec::new();
        };
        // (A held copy never asks: settling the free space may write to
        // the held region.)
        if self.in_window || self.free_failed {
            return Vec::new();
        }
        let spans: Vec<(usize, (u64, u64))> = ops
            .iter()
            .enumerate()
            .filter(|(_, o)| o.result == abi::REGION_OK)
            .filter_map(|(i, o)| Some((i, self.geo.copy_range(o.region)?)))
            .collect();
        let (Some(lo), Some(hi)) = (
            spans.iter().map(|(_, s)| s.0).min(),
            spans.iter().map(|(_, s)| s.1).max(),
        ) else {
            return Vec::new();
        };
        let res = tokio::task::spawn_blocking(move || -> std::io::Result<Vec<usize>> {
            let free = fs.free((lo, hi))?;
            let hits: Vec<usize> = spans
                .iter()
                .filter(|(_, s)| crate::fsmap::covers(&free, *s))
                .map(|&(i, _)| i)
                .collect();
            if !hits.is_empty() {
                fs.settle()?;
            }
            Ok(hits)
        })
        .await;
        match res {
            Ok(Ok(hits)) => hits,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "cannot read the filesystem's free space; copying every region");
                self.free_failed = true;
                Vec::new()
            }
            Err(e) => {
                tracing::warn!(error = %e, "the free-space query failed; copying every region");
                self.free_failed = true;
                Vec::new()
            }
        }
    }

    /// Copies every region in `regions`; returns how many committed.
    ///
    /// In batches of `queue_depth * 4` regions, each begun by one
    /// COPY_BEGIN and ended by one COPY_END, and `queue_depth` copies
    /// running at all times: the next batch is begun as soon as the last
    /// copy of the current one has started, so both devices stay busy
    /// while a batch finishes, and a batch is ended as soon as its last
    /// copy has completed (its writes complete before its COPY_END). On an
    /// error nothing more is begun or ended, and every copy still running
    /// is waited for before returning: a copier write still in flight when
    /// a later attempt commits its region could land over a mirrored write.
    async fn copy_all(&mut self, regions: &[u64]) -> Result<u64, MigrateError> {
        let per_batch = (self.opts.queue_depth.max(1) * 4).min(abi::REGION_OPS_MAX as usize);
        let mut chunks = regions.chunks(per_batch);
        let mut batches: Vec<Batch> = Vec::new();
        let mut set: tokio::task::JoinSet<CopyDone> = tokio::task::JoinSet::new();
        let mut bufs: Vec<Bufs> = Vec::new();
        let mut failed: Option<MigrateError> = None;
        let mut committed = 0;
        let started = Instant::now();
        // Not copy time, for the rate: waits for the rate limit (the pause
        // estimate needs the unthrottled rate, as the window is not
        // rate-limited), and beginning a batch while no copy runs.
        let mut idle = 0.0;
        loop {
            let depth = self.depth_now();
            while failed.is_none() && set.len() < depth {
                let b = match batches.len().checked_sub(1) {
                    Some(b) if batches[b].has_todo() => b,
                    _ => {
                        let Some(chunk) = chunks.next() else {
                            break;
                        };
                        if self.cancel.load(Ordering::Relaxed) {
                            failed = Some(Error::Interrupted.into());
                            break;
                        }
                        let t0 = Instant::now();
                        let mut batch = match self.begin_batch(chunk).await {
                            Ok(batch) => batch,
                            Err(e) => {
                                failed = Some(e);
                                break;
                            }
                        };
                        if set.is_empty() {
                            idle += t0.elapsed().as_secs_f64();
                        }
                        // Nothing to copy (busy, synced or free): end it now.
                        if batch.complete() {
                            match self.end_batch(&mut batch) {
                                Ok(n) => committed += n,
                                Err(e) => failed = Some(e),
                            }
                        }
                        batches.push(batch);
                        continue;
                    }
                };
                let batch = &mut batches[b];
                let i = batch.todo[batch.next];
                batch.next += 1;
                let r = batch.ops[i].region;
                let Some((off, len)) = self.geo.region_span(r) else {
                    continue;
                };
                if !self.limits.is_empty() && !self.in_window {
                    // Interrupted: the copies running are waited for below,
                    // and nothing more is committed, so every region not
                    // committed yet stays unsynced; that is safe.
                    let w0 = Instant::now();
                    if let Err(e) = crate::copy::pace_all(&self.limits, len, &self.cancel).await {
                        failed = Some(e.into());
                        break;
                    }
                    idle += w0.elapsed().as_secs_f64();
                }
                let mut buf = bufs
                    .pop()
                    .unwrap_or_else(|| Bufs::new(self.align, self.buf_len));
                let (src, tgt, compare) = (self.src.clone(), self.tgt.clone(), batches[b].compare);
                // The target's head is the switch's to write (after the
                // retire marker): a region in it is copied from the end of
                // the head on.
                let span = (off, len, self.geo.head_len(r));
                set.spawn_blocking(move || {
                    let res = crate::verify::transfer(&src, &tgt, &mut buf, span, compare);
                    (b, i, buf, res)
                });
                batches[b].running += 1;
            }
            let Some(res) = set.join_next().await else {
                break;
            };
            let (b, i, buf, res) = match res {
                Ok(done) => done,
                Err(e) => {
                    failed.get_or_insert(Error::joined(&e, "copy").into());
                    continue;
                }
            };
            bufs.push(buf);
            let batch = &mut batches[b];
            batch.running -= 1;
            match res {
                Ok(t) => batch.done.push((i, t)),
                Err(e) => {
                    failed.get_or_insert(e.into());
                }
            }
            if failed.is_none() && batch.complete() {
                match self.end_batch(batch) {
                    Ok(n) => committed += n,
                    Err(e) => failed = Some(e),
                }
            }
        }
        self.copy_secs += (started.elapsed().as_secs_f64() - idle).max(1e-6);
        match failed {
            Some(e) => Err(e),
            None => Ok(committed),
        }
    }

    /// Whether region `r` is hot (see [`HOT_RACES`]) and may be copied
    /// with the region hold: not a region of the head (the module refuses
    /// it), nor one whose held copies kept failing (see [`HOLD_STRIKES`]).
    fn hot(&self, r: u64) -> bool {
        self.raced.get(&r).is_some_and(|&n| n >= HOT_RACES)
            && self.geo.head_len(r) == 0
            && self.hold_strikes.get(&r).is_none_or(|&n| n < HOLD_STRIKES)
    }

    /// Copies the hot regions `hot` one at a time, each with the module's
    /// region hold. Before the hold: the rate limit is paced and the
    /// region's cached pages are written back, so that a write waits for
    /// one region's read and write at most. Under it, the source is read
    /// without waiting (`RWF_NOWAIT`): a read that would wait for writeback
    /// (whose writes the hold keeps) ends the hold at once and leaves the
    /// region to the switch window. Every error ends the hold it began.
    /// Returns how many committed.
    async fn copy_held(&mut self, hot: &[u64]) -> Result<u64, MigrateError> {
        let mut committed = 0;
        let mut bufs: Option<Bufs> = None;
        for &r in hot {
            if self.cancel.load(Ordering::Relaxed) {
                return Err(Error::Interrupted.into());
            }
            let Some((off, len)) = self.geo.region_span(r) else {
                continue;
            };
            if !self.limits.is_empty() {
                crate::copy::pace_all(&self.limits, len, &self.cancel).await?;
            }
            let src = self.src.clone();
            tokio::task::spawn_blocking(move || src.write_back(off, len))
                .await
                .map_err(|e| Error::joined(&e, "write back"))??;
            // COPY_BEGIN with the hold waits for the writes in flight to
            // the region: on the blocking pool, not on the executor.
            let tracker = self.tracker.clone();
            let mut ops = vec![RegionOp {
                region: r,
                flags: abi::REGION_OP_HOLD,
                ..RegionOp::default()
            }];
            let ops =
                tokio::task::spawn_blocking(move || tracker.copy_begin(&mut ops).map(|()| ops))
                    .await
                    .map_err(|e| Error::joined(&e, "copy begin"))??;
            let op = ops[0];
            if op.result != abi::REGION_OK {
                // Nothing is held (the module let it go). Busy: its writes
                // did not drain within the hold's limit, which they waited.
                if op.result == abi::REGION_BUSY {
                    *self.hold_strikes.entry(r).or_default() += 1;
                }
                self.count_refused(&ops)?;
                continue;
            }
            let (src, tgt) = (self.src.clone(), self.tgt.clone());
            let mut buf = bufs
                .take()
                .unwrap_or_else(|| Bufs::new(self.align, self.buf_len));
            let span = (off, len, self.geo.head_len(r));
            let t0 = Instant::now();
            let copied = tokio::task::spawn_blocking(move || {
                let res = crate::verify::transfer_held(&src, &tgt, &mut buf, span);
                (buf, res)
            })
            .await;
            let t = match copied {
                Ok((buf, Ok(Some(t)))) => {
                    bufs = Some(buf);
                    self.copy_secs += t0.elapsed().as_secs_f64().max(1e-6);
                    t
                }
                Ok((buf, Ok(None))) => {
                    bufs = Some(buf);
                    self.end_hold(op)?;
                    *self.hold_strikes.entry(r).or_default() += 1;
                    tracing::info!(
                        region = r,
                        "the held copy's read would have waited; the hold ended"
                    );
                    continue;
                }
                Ok((_, Err(e))) => {
                    let _ = self.end_hold(op);
                    return Err(e.into());
                }
                Err(e) => {
                    let _ = self.end_hold(op);
                    return Err(Error::joined(&e, "copy").into());
                }
            };
            // Never compared: the writes to the region wait for this copy.
            let mut batch = Batch {
                ops,
                compare: false,
                todo: Vec::new(),
                next: 0,
                running: 0,
                done: vec![(0, t)],
                ended: false,
            };
            committed += self.end_batch(&mut batch)?;
        }
        Ok(committed)
    }

    /// Ends the region hold `op` began without committing: COPY_END with
    /// a word that has SYNCED set, which never commits.
    fn end_hold(&self, op: RegionOp) -> Result<(), MigrateError> {
        let mut end = [RegionOp {
            word: op.word | blkmig_core::region::SYNCED,
            ..op
        }];
        self.tracker.copy_end(&mut end)?;
        Ok(())
    }

    /// How many copies to keep running now: all of them in the switch
    /// window (writes are held), fewer while the source is being written.
    fn depth_now(&mut self) -> usize {
        if self.in_window {
            return self.depth.full;
        }
        let now = Instant::now();
        if self.depth.due(now) {
            // A failed read leaves the depth as it was; the next one tells.
            if let Ok(st) = self.tracker.status() {
                self.depth.observe(now, st.writes_seen);
            }
        }
        self.depth.get(now)
    }

    /// Reads the source's head (writes are held). The read forces the
    /// page-cache writeback of the filesystem's dirty pages over it, which
    /// the module lets through (they are the copier's own writes).
    async fn read_head(&self) -> Result<Vec<u8>, MigrateError> {
        let (src, align, len) = (self.src.clone(), self.align, self.geo.head_bytes());
        let head = tokio::task::spawn_blocking(move || -> Result<Vec<u8>, Error> {
            let mut buf = AlignedBuf::new(align, len as usize);
            src.read_exact_at(&mut buf, 0)?;
            Ok(buf.to_vec())
        })
        .await
        .map_err(|e| Error::joined(&e, "read"))??;
        Ok(head)
    }

    /// Saves `head`, the source's head, where `migrate` can restore it
    /// from, durably, with what it belongs to
    /// ([`crate::recover::HeadMeta`]): after a crash between the retire
    /// marker and the target's head, it is what makes either device whole.
    async fn save_head(&self, head: &[u8]) -> Result<PathBuf, MigrateError> {
        let path = head_path(&self.opts.state_dir, &self.src);
        let p = path.clone();
        let meta = crate::recover::HeadMeta {
            migration_id: self.migration_id,
            head_bytes: head.len() as u64,
            crc32: crc32fast::hash(head),
            source: self.src.path().to_owned(),
            target: self.tgt.path().to_owned(),
        };
        let head = head.to_vec();
        tokio::task::spawn_blocking(move || -> Result<(), MigrateError> {
            let state = |source| MigrateError::State {
                path: p.clone(),
                source,
            };
            let json =
                serde_json::to_vec_pretty(&meta).map_err(|e| state(std::io::Error::other(e)))?;
            // The bytes first: a description never points at a head that
            // is not there.
            crate::recover::write_durably(&p, &head).map_err(state)?;
            crate::recover::write_durably(&p.with_file_name(crate::recover::HEAD_META_FILE), &json)
                .map_err(state)?;
            Ok(())
        })
        .await
        .map_err(|e| Error::joined(&e, "save"))??;
        Ok(path)
    }

    /// Inside the window: copies what is left, saves the source's head, and
    /// asks for the switch. The copier's own reads force the page-cache
    /// writeback of the source (let through, being the copier's), which can
    /// race a copy or change the head after it was read. So: copy until
    /// everything commits; read the head until no write reached it during
    /// the read (the module counts them: `Status::head_writes`) and every
    /// region is still synced; save it; and switch only if the count has
    /// not moved since (else the module answers `EAGAIN`, still holding, and
    /// this goes round again).
    async fn switch_in_window(&mut self) -> Result<bool, MigrateError> {
        let mut saved: Option<Vec<u8>> = None;
        for _ in 0..6 {
            let copying = Instant::now();
            let mut left = self.unsynced()?;
            for _ in 0..4 {
                if left.is_empty() {
                    break;
                }
                self.copy_all(&left).await?;
                left = self.unsynced()?;
            }
            if !left.is_empty() {
                tracing::warn!(left = left.len(), "regions did not commit with writes held");
                return Ok(false);
            }
            if self.verifier.is_some() && !self.verify_pending().await? {
                tracing::warn!("regions not verified with writes held");
                return Ok(false);
            }
            self.window_copy += copying.elapsed().as_secs_f64();
            let before = self.tracker.status()?.head_writes;
            // The head saved before the hold is still the source's if no
            // write reached it since that read began (the module checks the
            // same count again when it switches).
            if self.staged_head != Some(before) {
                let head = self.read_head().await?;
                if self.tracker.status()?.head_writes != before || !self.unsynced()?.is_empty() {
                    continue;
                }
                if saved.as_deref() != Some(&head[..]) {
                    self.summary.saved_head = Some(self.save_head(&head).await?);
                    saved = Some(head);
                }
                self.staged_head = Some(before);
            }
            let asked = Instant::now();
            match self.tracker.switch(before) {
                Ok(()) => return Ok(true),
                Err(e) if e.errno() == libc::ETIMEDOUT => {
                    // The hold's deadline came first, or the module found
                    // that the switch's last writes would end past it: the
                    // budget ran out, however early it said so. Those
                    // writes cost about what the switch had spent.
                    tracing::warn!(error = %e, "switch cancelled at the hold's deadline");
                    self.switch_ran_out = Some(asked.elapsed().as_secs_f64());
                    return Ok(false);
                }
                Err(e)
                    if e.errno() == libc::EAGAIN
                        && self.tracker.status()?.flags & abi::STATUS_HOLDING != 0 =>
                {
                    tracing::info!(
                        "the module found the head written or a region to copy; still holding"
                    );
                }
                Err(e) => {
                    tracing::warn!(error = %e, "switch refused");
                    return Ok(false);
                }
            }
        }
        tracing::warn!("the source's head or regions kept changing with writes held");
        Ok(false)
    }

    /// Reads and saves the source's head ahead of a hold, unless what was
    /// saved is still current; the window then only checks that no write
    /// reached the head since. Outside the hold, the read's writeback and
    /// the state directory's syncs (which may be on the source) cost no
    /// pause. The first time, it also gives the window's fixed cost a
    /// first estimate: the head is read, then written twice (the marker,
    /// the target's head), each about as long as the read.
    async fn stage_head(&mut self) -> Result<(), MigrateError> {
        let before = self.tracker.status()?.head_writes;
        if self.staged_head == Some(before) {
            return Ok(());
        }
        let t0 = Instant::now();
        let head = self.read_head().await?;
        let read = t0.elapsed().as_secs_f64();
        if self.tracker.status()?.head_writes != before {
            // Written while it was read: the window reads it.
            return Ok(());
        }
        self.summary.saved_head = Some(self.save_head(&head).await?);
        self.staged_head = Some(before);
        self.window_fixed.get_or_insert(3.0 * read);
        Ok(())
    }

    /// Flushes both devices' write caches just before a hold: the switch
    /// flushes the target and writes the marker and the target's head with
    /// FUA while writes are held, and those flushes then have only what
    /// was written since to make durable, not the whole copy's backlog.
    /// Their time is kept (`flush_ms`) for the hold's margin.
    async fn flush_ahead(&mut self) -> Result<(), MigrateError> {
        let (src, tgt) = (self.src.clone(), self.tgt.clone());
        let t0 = Instant::now();
        tokio::task::spawn_blocking(move || tgt.flush().and_then(|()| src.flush()))
            .await
            .map_err(|e| Error::joined(&e, "flush"))??;
        self.flush_ms = u32::try_from(t0.elapsed().as_millis()).unwrap_or(u32::MAX);
        Ok(())
    }

    /// The hold's timeout for one attempt (ms): see [`hold_timeout_ms`].
    fn hold_ms(&self) -> u32 {
        hold_timeout_ms(
            self.opts.max_pause.as_millis(),
            self.timer_late_ms,
            self.flush_ms,
        )
        .min(self.opts.hold_timeout_ms)
    }

    /// One switch attempt: hold, copy the rest, save the head, switch.
    /// Returns whether it switched. The hold ends at the budget (its
    /// timer), so an attempt that would take longer fails instead of
    /// holding writes past it; what the window took besides copying is
    /// kept for the next estimate, and attempts that keep running out of
    /// the budget end the migration with the reason.
    async fn try_switch(&mut self) -> Result<bool, MigrateError> {
        let hold_ms = self.hold_ms();
        let t0 = Instant::now();
        if let Err(e) = self.tracker.hold_writes(hold_ms) {
            tracing::warn!(error = %e, "could not hold writes for the switch");
            self.summary.failed_switches += 1;
            return Ok(false);
        }
        self.in_window = true;
        self.window_copy = 0.0;
        let res = self.switch_in_window().await;
        self.in_window = false;
        let took = t0.elapsed().as_secs_f64();
        let fixed = (took - self.window_copy).max(0.0);
        match res {
            Ok(true) => {
                self.window_fixed = Some(fixed);
                self.summary.switch_window_ms = Some(took * 1e3);
                self.summary.switched = true;
                self.progress.set(self.geo.bytes());
                self.progress.set_unsynced(0);
                tracing::info!(
                    window_ms = took * 1e3,
                    estimated_ms = self.summary.estimated_pause_ms.unwrap_or(0.0),
                    fixed_ms = fixed * 1e3,
                    "switched"
                );
                Ok(true)
            }
            other => {
                // Let the writes go; the filter would after its timeout.
                let _ = self.tracker.release();
                self.summary.failed_switches += 1;
                other?;
                let cancelled = self.switch_ran_out.take();
                if cancelled.is_none() && took * 1e3 + 1.0 < f64::from(hold_ms) {
                    return Ok(false);
                }
                // The budget ran out: the next estimate counts what the
                // window took besides copying, and what the switch would
                // have taken after the module cancelled it.
                // (At most the hold: the module released the writes then.)
                self.over_budget += 1;
                // The timer's lateness on this machine: the writes it
                // released waited past its timeout.
                if let Ok(st) = self.tracker.status() {
                    let late = (st.hold_longest_ns / 1_000_000).saturating_sub(u64::from(hold_ms));
                    self.timer_late_ms = self
                        .timer_late_ms
                        .max(u32::try_from(late).unwrap_or(u32::MAX));
                }
                let fixed = (fixed + cancelled.unwrap_or(0.0)).min(f64::from(hold_ms) / 1e3);
                self.window_fixed = Some(self.window_fixed.unwrap_or(0.0).max(fixed));
                tracing::warn!(
                    window_ms = took * 1e3,
                    fixed_ms = fixed * 1e3,
                    budget_ms = self.opts.max_pause.as_millis() as u64,
                    "the switch window ran out of the pause budget; writes released"
                );
                if self.over_budget >= OVER_BUDGET_ATTEMPTS {
                    let need = fixed * 1e3
                        + 2.0 * self.bytes_of(&self.boundaries()) as f64
                            / self.rate().unwrap_or(f64::INFINITY)
                            * 1e3;
                    return Err(MigrateError::SwitchOverBudget {
                        budget_ms: self.opts.max_pause.as_millis(),
                        attempts: self.over_budget,
                        fixed_ms: fixed * 1e3,
                        suggest_ms: ((need.max(took * 1e3) * 2.0 / 10.0).ceil() as u64).max(1) * 10,
                    });
                }
                Ok(false)
            }
        }
    }

    /// Runs the migration to the switch (or, with `no_switch`, until every
    /// region but the two boundary ones is synced).
    pub async fn run(mut self) -> Result<Summary, MigrateError> {
        let started = Instant::now();
        self.check_mode()?;
        self.wipe_boundaries().await?;
        // Waiting for busy or hot regions: the wait grows while nothing
        // commits, so a stuck region does not cost a core.
        let mut idle = IDLE_MIN;
        loop {
            if self.cancel.load(Ordering::Relaxed) {
                return Err(Error::Interrupted.into());
            }
            self.check_mode()?;
            self.summary.rounds += 1;
            let mut left = self.unsynced()?;
            // Hot regions are copied under a region hold before a switch is
            // considered: one region's writes wait a few ms now rather than
            // every write waiting for them in the switch window.
            let hot: Vec<u64> = left.iter().copied().filter(|&r| self.hot(r)).collect();
            if !self.opts.no_switch
                && !hot.is_empty()
                && self.rate().is_some()
                && self.copy_held(&hot).await? > 0
            {
                left = self.unsynced()?;
            }
            let body: Vec<u64> = left
                .iter()
                .copied()
                .filter(|&r| !self.boundary(r))
                .collect();
            if self.opts.no_switch {
                if body.is_empty() {
                    break;
                }
            } else if let Some(rate) = self.rate() {
                let est = self.estimate(&left, rate).await?;
                let budget = self.opts.max_pause.as_secs_f64();
                // The head is saved ahead of the hold once the copy is
                // close enough; the window's fixed cost then counts.
                let est = if est <= budget {
                    self.stage_head().await?;
                    est + self.window_fixed.unwrap_or(0.0)
                } else {
                    est
                };
                self.watch_convergence(left.len() as u64, est);
                if est <= budget {
                    self.summary.estimated_pause_ms = Some(est * 1e3);
                    tracing::info!(unsynced = left.len(), est_ms = est * 1e3, "switching");
                    self.flush_ahead().await?;
                    if self.try_switch().await? {
                        break;
                    }
                    // Back off a little before trying again.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
                self.check_reachable(rate, body.is_empty())?;
            } else if body.is_empty() {
                // Nothing was copied to measure a rate on (a resumed or
                // tiny migration): time a read of what is left.
                self.probe_rate(&left).await?;
                continue;
            }
            // The filesystem's free space first, in batches as large as the
            // filter takes: one query and one settle for many regions.
            let skipped = self.skip_free(&body).await?;
            let body = if skipped > 0 {
                let left = self.unsynced()?;
                left.into_iter().filter(|&r| !self.boundary(r)).collect()
            } else {
                body
            };
            let (hot, body): (Vec<u64>, Vec<u64>) = body.into_iter().partition(|&r| self.hot(r));
            let committed = skipped + self.copy_all(&body).await? + self.copy_held(&hot).await?;
            if committed == 0 {
                // Everything left is busy or raced: let the writes complete.
                tokio::time::sleep(idle).await;
                idle = (idle * 2).min(IDLE_MAX);
            } else {
                idle = IDLE_MIN;
            }
        }
        // The pause is the kernel's figure: the longest any write waited in
        // a hold, failed attempts included, whatever the copier's clock saw.
        let st = self.tracker.status()?;
        self.summary.holds = st.holds;
        self.summary.region_holds = st.region_holds;
        self.summary.region_hold_ms =
            (st.region_writes_held > 0).then_some(st.region_hold_longest_ns as f64 / 1e6);
        self.summary.pause_ms = (st.holds > 0).then_some(st.hold_longest_ns as f64 / 1e6);
        self.summary.seconds = started.elapsed().as_secs_f64();
        if let Some(v) = &self.verifier {
            v.fill(&mut self.summary);
        }
        Ok(self.summary)
    }

    /// The estimated pause of a switch now, in seconds, at `rate`: the time
    /// to copy `left`. With `--verify`, once that fits the budget, the
    /// regions not compared since their last copy are compared first, and
    /// the estimate adds the time to compare those left for the window.
    async fn estimate(&mut self, left: &[u64], rate: f64) -> Result<f64, MigrateError> {
        let est = self.bytes_of(left) as f64 / rate;
        if self.verifier.is_none() || est > self.opts.max_pause.as_secs_f64() {
            return Ok(est);
        }
        self.verify_pending().await?;
        let left = self.unsynced()?;
        let pending: Vec<u64> = self.verifier.iter().flat_map(|v| v.pending()).collect();
        Ok((self.bytes_of(&left) + self.bytes_of(&pending)) as f64 / rate)
    }

    /// `--verify`: compares every SYNCED region not compared since its last
    /// copy ([`crate::verify`]). Returns whether every region is verified.
    async fn verify_pending(&mut self) -> Result<bool, MigrateError> {
        let Some(mut v) = self.verifier.take() else {
            return Ok(true);
        };
        let cx = crate::verify::Ctx {
            tracker: &self.tracker,
            src: &self.src,
            tgt: &self.tgt,
            geo: self.geo,
            align: self.align,
            depth: self.opts.queue_depth,
            limits: if self.in_window { &[] } else { &self.limits },
            cancel: &self.cancel,
            free: self.opts.free_space.as_ref(),
        };
        let (t0, read) = (Instant::now(), v.counts.bytes_read);
        let res = v.pass(&cx).await;
        if !self.in_window && v.counts.bytes_read > read {
            // A comparison reads as much as a copy moves: it measures the
            // rate as well (a resumed migration may have copied nothing).
            self.copy_bytes += v.counts.bytes_read - read;
            self.copy_secs += t0.elapsed().as_secs_f64().max(1e-6);
        }
        let done = v.done();
        self.verifier = Some(v);
        res.map(|differed| differed == 0 && done)
    }

    /// Refuses a budget the switch can never meet: its window copies at
    /// least the last region and does its own work (measured by an attempt,
    /// or estimated from the head's read), so a budget below that time at
    /// the measured rate would wait forever. Judged once the rate rests on
    /// enough copying (or nothing else is left to copy).
    fn check_reachable(&self, rate: f64, nothing_else: bool) -> Result<(), MigrateError> {
        let window = self.bytes_of(&self.boundaries());
        let fixed = self.window_fixed.unwrap_or(0.0);
        let need = window as f64 / rate + fixed;
        let budget = self.opts.max_pause.as_secs_f64();
        let measured = self.copy_bytes >= RATE_SAMPLE_REGIONS * self.geo.region_bytes();
        if need <= budget || !(nothing_else || measured) {
            return Ok(());
        }
        // Half as much again as the estimate, in whole tens of ms.
        let suggest_ms = ((need * 1.5e3 / 10.0).ceil() as u64).max(1) * 10;
        Err(MigrateError::PauseUnreachable {
            budget_ms: self.opts.max_pause.as_millis(),
            window_bytes: window,
            rate_bytes_per_sec: rate,
            fixed_ms: fixed * 1e3,
            need_ms: need * 1e3,
            suggest_ms,
        })
    }

    /// The regions only the switch window copies: the last one.
    fn boundaries(&self) -> Vec<u64> {
        vec![self.geo.regions() - 1]
    }

    /// Tells the operator, once, when the unsynced set has stopped shrinking
    /// and the pause it would take does not fit the budget: the regions
    /// left are rewritten faster than they can be copied.
    fn watch_convergence(&mut self, unsynced: u64, est_secs: f64) {
        let round = self.summary.rounds;
        if unsynced < self.best.0 {
            self.best = (unsynced, round);
            return;
        }
        if !self.told_stalled && round >= self.best.1 + 50 {
            self.told_stalled = true;
            tracing::warn!(
                "not converging: {unsynced} regions are rewritten faster than they can be copied; \
                 switching now would hold writes for about {:.0} ms, over --max-pause {} ms. \
                 Still trying; a larger --max-pause or a smaller --region-size would let it finish",
                est_secs * 1e3,
                self.opts.max_pause.as_millis()
            );
        }
    }

    /// Times a read of up to two of `regions` from the source and counts it
    /// as copy work at half the speed (a copy also writes).
    async fn probe_rate(&mut self, regions: &[u64]) -> Result<(), MigrateError> {
        let started = Instant::now();
        let mut bytes = 0;
        // Nothing left to copy (a resume with every region in sync): time
        // the last region, or the rate would rest on no bytes at all.
        let last = [self.geo.regions() - 1];
        let regions = if regions.is_empty() {
            &last[..]
        } else {
            regions
        };
        for &r in regions.iter().take(2) {
            let Some((off, len)) = self.geo.region_span(r) else {
                continue;
            };
            let (src, align) = (self.src.clone(), self.align);
            tokio::task::spawn_blocking(move || {
                let mut buf = AlignedBuf::new(align, len as usize);
                src.read_exact_at(&mut buf, off)
            })
            .await
            .map_err(|e| Error::joined(&e, "read"))??;
            bytes += len;
        }
        self.copy_secs += 2.0 * started.elapsed().as_secs_f64().max(1e-6);
        self.copy_bytes += bytes.max(1);
        Ok(())
    }
}

/// The hold's timeout (ms) for a budget of `budget_ms`: the kernel releases
/// the writes at it, whatever the copier does, so it is the budget less a
/// margin for what may still hold them past it: the timer's granularity and
/// its work item's latency (a fifth of the budget, at least 10 ms, and at
/// least twice the lateness seen), and the switch's last writes, which end
/// past the deadline when they take longer than the module expects (as
/// long as the devices' flushes before the hold, `flush_ms`). A margin of
/// half the budget or more leaves half the budget.
fn hold_timeout_ms(budget_ms: u128, timer_late_ms: u32, flush_ms: u32) -> u32 {
    let margin = (budget_ms / 5)
        .max(10)
        .max(2 * u128::from(timer_late_ms))
        .max(u128::from(flush_ms));
    let hold = if budget_ms > 2 * margin {
        budget_ms - margin
    } else {
        (budget_ms / 2).max(1)
    };
    u32::try_from(hold).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hold_ends_short_of_the_budget_by_the_larger_margin() {
        // (budget, timer late, flushes) -> hold
        for (budget, late, flush, want) in [
            (100, 0, 0, 80),
            (100, 0, 5, 80),
            (100, 15, 0, 70),
            (100, 0, 29, 71),
            (100, 30, 29, 50),
            (100, 0, 60, 50),
            (30, 0, 0, 20),
            (15, 0, 0, 7),
            (1, 0, 0, 1),
            (5000, 0, 40, 4000),
        ] {
            assert_eq!(
                hold_timeout_ms(budget, late, flush),
                want,
                "budget {budget} ms, timer {late} ms late, flushes {flush} ms"
            );
        }
    }

    #[test]
    fn the_copy_keeps_its_busy_depth_while_the_source_is_written() {
        let t0 = Instant::now();
        let mut d = Depth::new(8, 2);
        assert!(d.due(t0));
        d.observe(t0, 100);
        assert_eq!(d.get(t0), 8, "the first count alone says nothing");
        assert!(!d.due(t0 + BUSY_SAMPLE / 2), "read again too soon");
        let t1 = t0 + BUSY_SAMPLE;
        assert!(d.due(t1));
        d.observe(t1, 100);
        assert_eq!(d.get(t1), 8, "no write since: full depth");
        let t2 = t1 + BUSY_SAMPLE;
        d.observe(t2, 101);
        assert_eq!(d.get(t2), 2, "a write: busy depth");
        assert_eq!(d.get(t2 + BUSY_LINGER / 2), 2, "it lingers");
        let t3 = t2 + BUSY_SAMPLE;
        d.observe(t3, 101);
        assert_eq!(d.get(t3), 2, "one quiet sample does not end it");
        assert_eq!(
            d.get(t2 + BUSY_LINGER),
            8,
            "full depth once the writes stop"
        );
    }

    #[test]
    fn the_busy_depth_is_within_one_and_the_queue_depth() {
        let now = Instant::now();
        for (full, busy, want) in [(8, 2, 2), (2, 8, 2), (4, 0, 1), (0, 0, 1)] {
            let mut d = Depth::new(full, busy);
            d.observe(now, 0);
            d.observe(now, 1);
            assert_eq!(d.get(now), want, "queue depth {full}, busy depth {busy}");
        }
    }

    #[test]
    fn the_pause_text_is_the_longest_hold_with_the_attempts() {
        let s = Summary {
            switched: true,
            holds: 2,
            failed_switches: 1,
            pause_ms: Some(5000.0),
            switch_window_ms: Some(18.8),
            ..Summary::default()
        };
        assert_eq!(
            s.pause_text(),
            "writes paused 5000.0 ms at the longest (2 holds, 1 failed switch attempts); the switch window lasted 18.8 ms"
        );
        let v = serde_json::to_value(&s).unwrap_or_default();
        for k in ["pause_ms", "switch_window_ms", "holds", "failed_switches"] {
            assert!(v.get(k).is_some(), "missing {k} in {v}");
        }
    }
}
