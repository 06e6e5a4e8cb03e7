//! The rebalance runner against simulated filters, on image files: how
//! many migrations run at once, a failure among them, a plan run twice,
//! an interruption, and the rate limit they share.

mod common;

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use blkmig::core::abi::{self, Mode, RegionOp, Status};
use blkmig::device::{Access, Device, Probe};
use blkmig::filter::FilterError;
use blkmig::migration::{MigrateError, MigrateOptions, Migration};
use blkmig::progress::Progress;
use blkmig::rebalance::{
    self, Launch, LaunchError, Launcher, Observer, Outcome, Plan, Planned, Prepared, Report,
    Running, Verdict,
};
use blkmig::tracker::Tracker;
use common::{pattern, SimFilter};

const SIZE: u64 = 4 << 20;
const SHIFT: u32 = 16; // 64 KiB regions: 64 of them

/// A source being migrated through a simulated filter, and what a writer
/// wrote to it.
struct Pair {
    sim: Arc<SimFilter>,
    /// Filter requests go through this (the simulation, or a target that
    /// fails).
    tracker: Arc<dyn Tracker>,
    src: Arc<Device>,
    tgt: Arc<Device>,
    tgt_file: File,
    shadow: Arc<Mutex<Vec<u8>>>,
}

/// Simulated migrations by source path. Counts the migrations that run at
/// once, and the abandoned ones.
struct SimLauncher {
    _dir: tempfile::TempDir,
    pairs: HashMap<PathBuf, Pair>,
    running: AtomicUsize,
    most: AtomicUsize,
    runs: AtomicUsize,
    abandoned: Mutex<Vec<PathBuf>>,
}

/// A tracker whose target fails after `after` committed copies: the filter
/// then reports FAILED, as the module does when a mirrored write fails.
struct FailingTarget {
    sim: Arc<SimFilter>,
    after: u64,
    ends: AtomicU64,
}

impl Tracker for FailingTarget {
    fn status(&self) -> Result<Status, FilterError> {
        let mut st = self.sim.status()?;
        if self.ends.load(Ordering::SeqCst) >= self.after {
            st.mode = Mode::Failed as u32;
            st.failure = abi::Failure::TargetWrite as u32;
            st.failure_errno = libc::EIO;
        }
        Ok(st)
    }
    fn copy_begin(&self, ops: &mut [RegionOp]) -> Result<(), FilterError> {
        self.sim.copy_begin(ops)
    }
    fn copy_end(&self, ops: &mut [RegionOp]) -> Result<(), FilterError> {
        self.ends.fetch_add(ops.len() as u64, Ordering::SeqCst);
        self.sim.copy_end(ops)
    }
    fn verify_begin(&self, ops: &mut [RegionOp]) -> Result<(), FilterError> {
        self.sim.verify_begin(ops)
    }
    fn verify_end(&self, ops: &mut [RegionOp]) -> Result<(), FilterError> {
        self.sim.verify_end(ops)
    }
    fn unsync(&self, ops: &mut [RegionOp]) -> Result<(), FilterError> {
        self.sim.unsync(ops)
    }
    fn synced(&self, first: u64, count: u64) -> Result<Vec<bool>, FilterError> {
        self.sim.synced(first, count)
    }
    fn hold_writes(&self, timeout_ms: u32) -> Result<(), FilterError> {
        self.sim.hold_writes(timeout_ms)
    }
    fn switch(&self, head_writes: u64) -> Result<(), FilterError> {
        if self.ends.load(Ordering::SeqCst) >= self.after {
            // As the module: a FAILED migration never switches.
            return Err(FilterError::Refused {
                path: "simulated".into(),
                request: blkmig::filter::Request::Ctl(abi::CtlCmd::Switch),
                errno: libc::EINVAL,
            });
        }
        self.sim.switch(head_writes)
    }
    fn release(&self) -> Result<(), FilterError> {
        self.sim.release()
    }
}

fn open(p: &Path, write: bool) -> Arc<Device> {
    let probe = Probe::new(p).unwrap_or_else(|e| panic!("{e}"));
    let access = Access {
        write,
        direct: false,
        exclusive: false,
    };
    Arc::new(Device::open(&probe, access).unwrap_or_else(|e| panic!("{e}")))
}

fn rw(p: &Path) -> File {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(p)
        .unwrap_or_else(|e| panic!("{p:?}: {e}"))
}

impl SimLauncher {
    /// `n` pairs `src<i>.img -> tgt<i>.img`; the target of each pair in
    /// `failing` fails after a few copies.
    fn new(n: usize, failing: &[usize]) -> Arc<Self> {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let mut pairs = HashMap::new();
        for i in 0..n {
            let (sp, tp) = (
                dir.path().join(format!("src{i}.img")),
                dir.path().join(format!("tgt{i}.img")),
            );
            let data = pattern(SIZE as usize, 10 * i as u64 + 3);
            fs::write(&sp, &data).unwrap_or_else(|e| panic!("{e}"));
            fs::write(&tp, pattern(SIZE as usize, 10 * i as u64 + 1001))
                .unwrap_or_else(|e| panic!("{e}"));
            let sim = SimFilter::new(rw(&sp), rw(&tp), SIZE, SHIFT);
            let tracker: Arc<dyn Tracker> = if failing.contains(&i) {
                Arc::new(FailingTarget {
                    sim: sim.clone(),
                    after: 5,
                    ends: AtomicU64::new(0),
                })
            } else {
                sim.clone()
            };
            let pair = Pair {
                sim,
                tracker,
                src: open(&sp, false),
                tgt: open(&tp, true),
                tgt_file: rw(&tp),
                shadow: Arc::new(Mutex::new(data)),
            };
            pairs.insert(sp, pair);
        }
        Arc::new(Self {
            _dir: dir,
            pairs,
            running: AtomicUsize::new(0),
            most: AtomicUsize::new(0),
            runs: AtomicUsize::new(0),
            abandoned: Mutex::new(Vec::new()),
        })
    }

    fn src(&self, i: usize) -> PathBuf {
        self._dir.path().join(format!("src{i}.img"))
    }

    fn pair(&self, i: usize) -> &Pair {
        &self.pairs[&self.src(i)]
    }

    /// A plan over the pairs `0..n`, with `head` before `"migrations"`.
    fn plan(&self, n: usize, head: &str) -> Plan {
        let list: Vec<String> = (0..n)
            .map(|i| {
                format!(
                    r#"{{"source": {:?}, "target": {:?}}}"#,
                    self.src(i),
                    self._dir.path().join(format!("tgt{i}.img"))
                )
            })
            .collect();
        let state = self._dir.path().join("state");
        let text = format!(
            r#"{{ {head} "state_dir": {state:?}, "migrations": [{}] }}"#,
            list.join(", ")
        );
        Plan::from_json(&text, Path::new("test-plan.json")).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Writers on every pair (one thread each) until `stop`.
    fn writers(&self, stop: &Arc<AtomicBool>) -> Vec<std::thread::JoinHandle<()>> {
        self.pairs
            .values()
            .enumerate()
            .map(|(w, p)| {
                let (sim, shadow, stop) = (p.sim.clone(), p.shadow.clone(), stop.clone());
                std::thread::spawn(move || {
                    let mut x = 0x2545_f491_4f6c_dd1du64 ^ w as u64;
                    while !stop.load(Ordering::Relaxed) && sim.mode() != Mode::Redirect {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        let len = 4096 * (1 + (x >> 40) % 16);
                        let off = ((x % SIZE) & !4095).min(SIZE - len);
                        let data = pattern(len as usize, x);
                        sim.write(off, &data);
                        shadow.lock().unwrap_or_else(|e| e.into_inner())
                            [off as usize..(off + len) as usize]
                            .copy_from_slice(&data);
                        std::thread::sleep(Duration::from_micros(500));
                    }
                })
            })
            .collect()
    }

    /// Pair `i` switched and its target holds what the writer wrote
    /// (past the head, which the simulated switch writes).
    fn check_switched(&self, i: usize) {
        let p = self.pair(i);
        assert_eq!(p.sim.mode(), Mode::Redirect, "pair {i} did not switch");
        let mut tgt = vec![0u8; SIZE as usize];
        p.tgt_file
            .read_exact_at(&mut tgt, 0)
            .unwrap_or_else(|e| panic!("{e}"));
        let shadow = p.shadow.lock().unwrap_or_else(|e| e.into_inner());
        let bad = (0..SIZE as usize).find(|&b| tgt[b] != shadow[b]);
        assert_eq!(bad, None, "pair {i}: the target differs from the source");
    }
}

struct SimReady {
    launcher: Arc<SimLauncher>,
    source: PathBuf,
    resumed: bool,
}

impl Prepared for SimReady {
    fn resumed(&self) -> bool {
        self.resumed
    }
    fn bytes(&self) -> u64 {
        SIZE
    }
    fn regions(&self) -> u64 {
        SIZE >> SHIFT
    }
    fn run(
        self: Box<Self>,
        opts: MigrateOptions,
        progress: Arc<Progress>,
        cancel: Arc<AtomicBool>,
    ) -> Running {
        Box::pin(async move {
            let l = self.launcher.clone();
            let p = &l.pairs[&self.source];
            let st = p.sim.status()?;
            let m = Migration::new(
                p.tracker.clone(),
                p.src.clone(),
                p.tgt.clone(),
                &st,
                opts,
                progress,
                cancel,
            )?;
            let now = l.running.fetch_add(1, Ordering::SeqCst) + 1;
            l.most.fetch_max(now, Ordering::SeqCst);
            l.runs.fetch_add(1, Ordering::SeqCst);
            let res = m.run().await;
            l.running.fetch_sub(1, Ordering::SeqCst);
            res
        })
    }
}

/// The launcher behind an `Arc`, as the runner wants it, with a handle on
/// the counts.
struct Handle(Arc<SimLauncher>);

impl Launcher for Handle {
    fn launch(&self, m: &Planned, _: &Path) -> Result<Launch, LaunchError> {
        let p = &self.0.pairs[&m.source];
        let st = p.tracker.status().map_err(MigrateError::from)?;
        match Mode::from_raw(st.mode) {
            Some(Mode::Redirect) => Ok(Launch::Switched("already switched (simulated)".into())),
            Some(Mode::Failed) => {
                Err(MigrateError::Failed("failed before (simulated)".into()).into())
            }
            _ => Ok(Launch::Ready(Box::new(SimReady {
                launcher: self.0.clone(),
                source: m.source.clone(),
                resumed: st.regions_synced > 0,
            }))),
        }
    }

    fn abandon(&self, m: &Planned, _: &Path) -> Result<(), MigrateError> {
        self.0
            .abandoned
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(m.source.clone());
        Ok(())
    }
}

/// Records the order in which migrations start and end.
#[derive(Default)]
struct Log(Mutex<Vec<String>>);

impl Observer for Log {
    fn started(&self, i: usize, _: &Planned, _: bool, _: Arc<Progress>) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(format!("start {i}"));
    }
    fn finished(&self, i: usize, _: &Outcome) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(format!("end {i}"));
    }
}

async fn run(l: &Arc<SimLauncher>, plan: &Plan, cancel: Arc<AtomicBool>) -> (Report, Vec<String>) {
    let log = Arc::new(Log::default());
    let r = tokio::time::timeout(
        Duration::from_secs(120),
        rebalance::run(plan, Arc::new(Handle(l.clone())), log.clone(), cancel),
    )
    .await
    .unwrap_or_else(|_| panic!("the rebalance did not end in 120 s"));
    let events = log.0.lock().unwrap_or_else(|e| e.into_inner()).clone();
    (r, events)
}

fn verdicts(r: &Report) -> Vec<Verdict> {
    r.results.iter().map(|o| o.result).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_most_concurrency_migrations_run_at_once_under_writes() {
    let l = SimLauncher::new(5, &[]);
    // Slow enough that the migrations overlap: 4 MiB at 8 MiB/s each.
    let plan = l.plan(5, r#""concurrency": 2, "options": {"rate_limit": "8M"},"#);
    let stop = Arc::new(AtomicBool::new(false));
    let writers = l.writers(&stop);
    let (r, events) = run(&l, &plan, Arc::new(AtomicBool::new(false))).await;
    stop.store(true, Ordering::Relaxed);
    writers
        .into_iter()
        .for_each(|w| w.join().unwrap_or_else(|_| panic!("writer")));
    assert_eq!(verdicts(&r), vec![Verdict::Switched; 5], "{r:?}");
    assert!(r.ok);
    assert_eq!(l.runs.load(Ordering::SeqCst), 5);
    assert_eq!(
        l.most.load(Ordering::SeqCst),
        2,
        "most migrations at once (concurrency 2); events {events:?}"
    );
    // In the plan's order: 0 and 1 first, the third only after one ended.
    let mut first = events[..2].to_vec();
    first.sort();
    assert_eq!(first, ["start 0", "start 1"], "{events:?}");
    assert!(events[2].starts_with("end"), "{events:?}");
    (0..5).for_each(|i| l.check_switched(i));
    assert_eq!(r.totals.switched, 5);
    assert!(r
        .results
        .iter()
        .all(|o| o.migration.as_ref().is_some_and(|s| s.switched)));
    // `migrate rebalance --json` prints this report as docs/json.md says.
    common::check_json(&["rebalance"], &blkmig::output::rebalance(&r));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_migration_does_not_stop_the_others_and_is_named() {
    let l = SimLauncher::new(3, &[1]);
    // One at a time: the one after the failure must still start.
    let plan = l.plan(3, r#""concurrency": 1,"#);
    let stop = Arc::new(AtomicBool::new(false));
    let writers = l.writers(&stop);
    let (r, _) = run(&l, &plan, Arc::new(AtomicBool::new(false))).await;
    stop.store(true, Ordering::Relaxed);
    writers
        .into_iter()
        .for_each(|w| w.join().unwrap_or_else(|_| panic!("writer")));
    common::check_json(&["rebalance"], &blkmig::output::rebalance(&r));
    assert_eq!(
        verdicts(&r),
        vec![Verdict::Switched, Verdict::Failed, Verdict::Switched],
        "{r:?}"
    );
    assert!(!r.ok);
    assert_eq!((r.totals.switched, r.totals.failed), (2, 1));
    let failed = &r.results[1];
    assert_eq!(failed.source, l.src(1));
    let why = failed.reason.as_deref().unwrap_or_default();
    assert!(
        why.contains("a write to the target failed") && why.contains("abandoned"),
        "{why}"
    );
    // The CLI's advice (abort it, rerun) contradicts what the runner did.
    assert!(
        !why.contains("migrate abort") && !why.contains("stays attached"),
        "{why}"
    );
    assert_eq!(
        *l.abandoned.lock().unwrap_or_else(|e| e.into_inner()),
        vec![l.src(1)],
        "the failed migration, and only it, is abandoned"
    );
    assert_ne!(
        l.pair(1).sim.mode(),
        Mode::Redirect,
        "the failed pair switched"
    );
    l.check_switched(0);
    l.check_switched(2);
    let j = serde_json::to_value(&r).unwrap_or_default();
    assert_eq!(j["results"][1]["result"], "failed");
    assert_eq!(j["totals"]["failed"], 1);
    assert_eq!(j["ok"], false);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plan_run_again_skips_what_switched() {
    let l = SimLauncher::new(2, &[]);
    let plan = l.plan(2, r#""concurrency": 2,"#);
    let (first, _) = run(&l, &plan, Arc::new(AtomicBool::new(false))).await;
    assert_eq!(verdicts(&first), vec![Verdict::Switched; 2], "{first:?}");
    let (again, events) = run(&l, &plan, Arc::new(AtomicBool::new(false))).await;
    assert_eq!(verdicts(&again), vec![Verdict::Skipped; 2], "{again:?}");
    assert!(again.ok, "skipped migrations are a success");
    assert_eq!(again.totals.skipped, 2);
    assert!(events.iter().all(|e| e.starts_with("end")), "{events:?}");
    assert_eq!(
        l.runs.load(Ordering::SeqCst),
        2,
        "a switched pair ran again"
    );
    assert!(again.results[0]
        .reason
        .as_deref()
        .is_some_and(|r| r.contains("already switched")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interruption_abandons_the_running_and_starts_no_more_and_a_rerun_resumes() {
    let l = SimLauncher::new(3, &[]);
    let plan = l.plan(3, r#""concurrency": 1, "options": {"rate_limit": "2M"},"#);
    let cancel = Arc::new(AtomicBool::new(false));
    let c = cancel.clone();
    let l2 = l.clone();
    // Interrupt once the first migration has some regions in sync.
    let t0 = Instant::now();
    let watcher = std::thread::spawn(move || {
        while l2.pair(0).sim.status().map_or(0, |s| s.regions_synced) < 4 {
            assert!(t0.elapsed() < Duration::from_secs(60), "no region synced");
            std::thread::sleep(Duration::from_millis(5));
        }
        c.store(true, Ordering::Relaxed);
    });
    let (r, _) = run(&l, &plan, cancel).await;
    watcher.join().unwrap_or_else(|_| panic!("watcher"));
    assert_eq!(verdicts(&r), vec![Verdict::Cancelled; 3], "{r:?}");
    assert!(!r.ok);
    assert_eq!(
        l.runs.load(Ordering::SeqCst),
        1,
        "a migration started after the interruption"
    );
    assert!(r.results[2]
        .reason
        .as_deref()
        .is_some_and(|s| s.contains("not started")));
    assert!(l
        .abandoned
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .is_empty());
    // The same plan again: the first resumes (regions in sync), all switch.
    let (again, _) = run(&l, &plan, Arc::new(AtomicBool::new(false))).await;
    assert_eq!(verdicts(&again), vec![Verdict::Switched; 3], "{again:?}");
    assert!(
        again.results[0].resumed && !again.results[1].resumed,
        "{again:?}"
    );
    assert_eq!(again.totals.resumed, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_total_rate_limit_is_shared_by_the_running_migrations() {
    let l = SimLauncher::new(2, &[]);
    // Two migrations of 4 MiB at once, 4 MiB/s in all: up to two seconds
    // (what is left for the switch window is not paced), where each one's
    // own limit (64 MiB/s) would let both end in an eighth of a second.
    let plan = l.plan(
        2,
        r#""concurrency": 2, "total_rate_limit": "4M", "options": {"rate_limit": "64M"},"#,
    );
    let t0 = Instant::now();
    let (r, _) = run(&l, &plan, Arc::new(AtomicBool::new(false))).await;
    let took = t0.elapsed();
    assert_eq!(verdicts(&r), vec![Verdict::Switched; 2], "{r:?}");
    assert_eq!(l.most.load(Ordering::SeqCst), 2);
    assert!(
        took >= Duration::from_millis(1000),
        "{took:?}: the total limit was not applied"
    );
}
