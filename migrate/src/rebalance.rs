//! `migrate rebalance`: many live migrations from one plan.
//!
//! A plan ([`Plan`], JSON) names source → target pairs and how to run them:
//! at most `concurrency` at once, a rate limit per migration and one shared
//! by all of them, the pause budget, the state directory. [`Plan::load`]
//! refuses a bad plan (unknown key, bad unit, a device named twice, a
//! source that is its own target, concurrency 0) and
//! [`Plan::check_devices`] one whose devices are missing, not block
//! devices, or the same device under two names, before anything starts.
//!
//! [`run`] then starts the migrations in the plan's order, at most
//! `concurrency` at once, and goes on when one fails. Each migration goes
//! through a [`Launcher`]: [`LiveLauncher`] uses [`crate::live::start`], so
//! that a plan run again resumes what is attached and still cloning and
//! skips what has switched already (blkmig in REDIRECT to the same target,
//! or, with nothing attached, a source retired onto it). A migration that
//! fails is abandoned (blkmig detached: the source is untouched, the target
//! released), so that running the plan again starts it afresh. The
//! [`Report`] says what happened to each pair.

use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use blkmig_core::abi;
use governor::DefaultDirectRateLimiter;
use serde::{Deserialize, Serialize};

use crate::device::{DevId, Kind, Probe};
use crate::error::{Error, Refusal};
use crate::filter::{FilterError, Filtered};
use crate::live::{self, AttachRequest, Begin, Start};
use crate::migration::{MigrateError, MigrateOptions, Summary};
use crate::progress::Progress;
use crate::recover::Finding;
use crate::units::{self, Bytes};

/// The state directory when the plan names none.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/blkmig";

/// How one migration runs; the plan's `options`, overridden per pair.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Options {
    /// Rate limit of this migration's background copy.
    pub rate_limit: Option<Bytes>,
    /// Switch only when the estimated pause fits.
    pub max_pause: Duration,
    /// How long the kernel may hold writes for one switch attempt.
    pub hold_timeout: Duration,
    /// Region size (a new attachment only; a resumed one keeps its own).
    pub region_size: Bytes,
    /// Regions copied at once.
    pub queue_depth: usize,
    /// Compare every region before the switch.
    pub verify: bool,
}

impl Default for Options {
    /// The defaults of `migrate start`.
    fn default() -> Self {
        Self {
            rate_limit: None,
            max_pause: Duration::from_millis(100),
            hold_timeout: Duration::from_secs(5),
            region_size: Bytes(1 << 20),
            queue_depth: 8,
            verify: false,
        }
    }
}

/// One migration of the plan.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Planned {
    /// The live source block device.
    pub source: PathBuf,
    /// Its target.
    pub target: PathBuf,
    /// How to run it.
    pub options: Options,
}

impl Planned {
    fn request(&self) -> AttachRequest {
        AttachRequest {
            source: self.source.clone(),
            target: self.target.clone(),
            region_size: self.options.region_size,
            hold_timeout_ms: u32::try_from(self.options.hold_timeout.as_millis())
                .unwrap_or(u32::MAX),
        }
    }
}

/// A checked plan.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    /// The file it came from (named in errors and in the report).
    pub path: PathBuf,
    /// Migrations at once, at least 1.
    pub concurrency: usize,
    /// Rate limit shared by all the migrations running at once.
    pub total_rate_limit: Option<Bytes>,
    /// Where every source's head is saved before it is retired.
    pub state_dir: PathBuf,
    /// The migrations, in the order they start.
    pub migrations: Vec<Planned>,
}

/// The plan as written. Sizes and durations are strings with units
/// (`"200M"`, `"100ms"`), parsed as `migrate start` parses its options.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPlan {
    concurrency: Option<u64>,
    total_rate_limit: Option<String>,
    state_dir: Option<PathBuf>,
    #[serde(default)]
    options: RawOptions,
    migrations: Vec<RawPair>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOptions {
    rate_limit: Option<String>,
    max_pause: Option<String>,
    hold_timeout: Option<String>,
    region_size: Option<String>,
    queue_depth: Option<u64>,
    verify: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPair {
    source: PathBuf,
    target: PathBuf,
    #[serde(default)]
    options: RawOptions,
}

/// Why a plan is refused. Nothing has been started or changed.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    /// The file could not be read.
    #[error("cannot read the plan {path}", path = .path.display())]
    Read {
        /// The plan.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Not a plan: bad JSON, an unknown or missing key, a value of the
    /// wrong type.
    #[error("the plan {path} is not a valid plan", path = .path.display())]
    Syntax {
        /// The plan.
        path: PathBuf,
        /// What serde found, with the line and column.
        #[source]
        source: serde_json::Error,
    },
    /// A value is out of range, or devices are named twice.
    #[error("the plan {path}: {at}: {problem}", path = .path.display())]
    Invalid {
        /// The plan.
        path: PathBuf,
        /// Where in it (`concurrency`, `migrations[2].options.rate_limit`).
        at: String,
        /// What is wrong.
        problem: String,
    },
    /// A device is missing, not a block device, or one device is named
    /// twice under different paths.
    #[error("the plan {path}: {at}", path = .path.display())]
    Device {
        /// The plan.
        path: PathBuf,
        /// Where in it (`migrations[1].target`).
        at: String,
        /// The device's refusal or error.
        #[source]
        source: Error,
    },
}

fn parse_with<T>(
    v: &Option<String>,
    at: &str,
    parse: impl Fn(&str) -> Result<T, String>,
) -> Result<Option<T>, (String, String)> {
    v.as_deref()
        .map(|s| parse(s).map_err(|e| (at.to_owned(), e)))
        .transpose()
}

fn region_size(s: &str) -> Result<Bytes, String> {
    let b: Bytes = s
        .parse()
        .map_err(|e: units::ParseSizeError| e.to_string())?;
    let (min, max) = (1u64 << abi::REGION_SHIFT_MIN, 1u64 << abi::REGION_SHIFT_MAX);
    if !b.0.is_power_of_two() || b.0 < min || b.0 > max {
        return Err(format!(
            "invalid region size {s:?}: it must be a power of two from {} to {}",
            Bytes(min),
            Bytes(max)
        ));
    }
    Ok(b)
}

impl RawOptions {
    /// `base` with what these options set; errors name `at.KEY`.
    fn over(&self, base: &Options, at: &str) -> Result<Options, (String, String)> {
        let key = |k: &str| format!("{at}.{k}");
        let mut o = base.clone();
        if let Some(r) = parse_with(&self.rate_limit, &key("rate_limit"), units::parse_rate)? {
            o.rate_limit = Some(r);
        }
        if let Some(d) = parse_with(
            &self.max_pause,
            &key("max_pause"),
            units::parse_positive_duration,
        )? {
            o.max_pause = d;
        }
        if let Some(d) = parse_with(
            &self.hold_timeout,
            &key("hold_timeout"),
            units::parse_hold_timeout,
        )? {
            o.hold_timeout = d;
        }
        if let Some(b) = parse_with(&self.region_size, &key("region_size"), region_size)? {
            o.region_size = b;
        }
        if let Some(q) = self.queue_depth {
            if !(1..=256).contains(&q) {
                return Err((
                    key("queue_depth"),
                    format!("{q} is out of range: regions copied at once, from 1 to 256"),
                ));
            }
            o.queue_depth = q as usize;
        }
        if let Some(v) = self.verify {
            o.verify = v;
        }
        Ok(o)
    }
}

impl Plan {
    /// Reads and checks the plan at `path` (JSON). Devices are not looked
    /// at: see [`Plan::check_devices`].
    pub fn load(path: &Path) -> Result<Self, PlanError> {
        if path.extension().is_some_and(|e| e == "toml") {
            return Err(PlanError::Invalid {
                path: path.to_owned(),
                at: "format".to_owned(),
                problem: "plans are JSON (see docs/operations.md, \"Rebalance many devices\"); this build reads no TOML".to_owned(),
            });
        }
        let text = std::fs::read_to_string(path).map_err(|source| PlanError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_json(&text, path)
    }

    /// Parses and checks a plan; `path` is what errors call it.
    pub fn from_json(text: &str, path: &Path) -> Result<Self, PlanError> {
        let raw: RawPlan = serde_json::from_str(text).map_err(|source| PlanError::Syntax {
            path: path.to_owned(),
            source,
        })?;
        let invalid = |(at, problem): (String, String)| PlanError::Invalid {
            path: path.to_owned(),
            at,
            problem,
        };
        let concurrency = match raw.concurrency.unwrap_or(1) {
            0 => {
                return Err(invalid((
                    "concurrency".into(),
                    "must be at least 1 (migrations at once)".into(),
                )))
            }
            n => usize::try_from(n).unwrap_or(usize::MAX),
        };
        let total_rate_limit =
            parse_with(&raw.total_rate_limit, "total_rate_limit", units::parse_rate)
                .map_err(invalid)?;
        if raw.migrations.is_empty() {
            return Err(invalid((
                "migrations".into(),
                "the plan names no migration".into(),
            )));
        }
        let base = raw
            .options
            .over(&Options::default(), "options")
            .map_err(invalid)?;
        let mut seen: HashMap<&Path, String> = HashMap::new();
        let mut migrations = Vec::with_capacity(raw.migrations.len());
        for (i, p) in raw.migrations.iter().enumerate() {
            let at = format!("migrations[{i}]");
            for (role, dev) in [("source", &p.source), ("target", &p.target)] {
                if dev.as_os_str().is_empty() {
                    return Err(invalid((format!("{at}.{role}"), "is empty".into())));
                }
                let here = format!("{at}.{role}");
                if let Some(first) = seen.insert(dev, here.clone()) {
                    let problem = if first == format!("{at}.source") {
                        format!(
                            "{} is both the source and the target of one migration",
                            dev.display()
                        )
                    } else {
                        format!(
                            "{} is named again (it is {first} already): a device may appear once in a plan",
                            dev.display()
                        )
                    };
                    return Err(invalid((here, problem)));
                }
            }
            let options = p
                .options
                .over(&base, &format!("{at}.options"))
                .map_err(invalid)?;
            migrations.push(Planned {
                source: p.source.clone(),
                target: p.target.clone(),
                options,
            });
        }
        Ok(Self {
            path: path.to_owned(),
            concurrency,
            total_rate_limit,
            state_dir: raw
                .state_dir
                .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR)),
            migrations,
        })
    }

    /// Looks every device up: refuses a path that does not exist or is not
    /// a block device, and one device (or a partition and its disk) named
    /// twice under different paths. Opens nothing.
    pub fn check_devices(&self) -> Result<(), PlanError> {
        let mut probes: Vec<(String, Probe)> = Vec::new();
        for (i, m) in self.migrations.iter().enumerate() {
            for (role, dev) in [("source", &m.source), ("target", &m.target)] {
                let at = format!("migrations[{i}].{role}");
                if role == "source" && removed_after_switch(m, &self.state_dir) {
                    // Unplugged after an earlier run switched it: skipped.
                    continue;
                }
                let p = Probe::new(dev).map_err(|source| PlanError::Device {
                    path: self.path.clone(),
                    at: at.clone(),
                    source,
                })?;
                for (first, q) in &probes {
                    q.check_distinct(&p).map_err(|source| PlanError::Device {
                        path: self.path.clone(),
                        at: format!("{at} (and {first})"),
                        source,
                    })?;
                }
                probes.push((at, p));
            }
        }
        // Named once each: now whether they are block devices.
        match probes.into_iter().find(|(_, p)| p.kind != Kind::Block) {
            Some((at, p)) => Err(PlanError::Device {
                path: self.path.clone(),
                at,
                source: Error::refused(&p.path, Refusal::NotBlock),
            }),
            None => Ok(()),
        }
    }

    /// The limiter of `total_rate_limit`, shared by every migration; its
    /// burst is two of the largest regions (a verification reads both
    /// devices).
    fn shared_limit(&self) -> Option<Arc<DefaultDirectRateLimiter>> {
        let region = self
            .migrations
            .iter()
            .map(|m| m.options.region_size.0)
            .max()
            .unwrap_or(1 << 20);
        crate::copy::limiter(self.total_rate_limit, 2 * region)
    }
}

/// What became of one migration.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// It switched: all I/O to the source now goes to the target.
    Switched,
    /// It had switched before this run: nothing was done.
    Skipped,
    /// It failed; the source is untouched (see the reason).
    Failed,
    /// Interrupted (Ctrl-C, SIGTERM): abandoned, or never started.
    Cancelled,
}

/// One migration's result, as the report gives it.
#[derive(Clone, Debug, Serialize)]
pub struct Outcome {
    /// The source.
    pub source: PathBuf,
    /// The target.
    pub target: PathBuf,
    /// What became of it.
    pub result: Verdict,
    /// Whether it resumed a migration that was attached already.
    pub resumed: bool,
    /// Why it failed, was skipped or was cancelled; `None` when it switched.
    pub reason: Option<String>,
    /// Seconds this run spent on it.
    pub seconds: f64,
    /// The migration's own summary (as `migrate start --json` prints it)
    /// when it ran to the end.
    pub migration: Option<Summary>,
}

/// Counts over the report.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Totals {
    /// Migrations in the plan.
    pub migrations: usize,
    /// Switched in this run.
    pub switched: usize,
    /// Switched before this run.
    pub skipped: usize,
    /// Failed.
    pub failed: usize,
    /// Interrupted or never started.
    pub cancelled: usize,
    /// Of those that ran, how many resumed an attached migration.
    pub resumed: usize,
    /// Seconds of the whole run.
    pub seconds: f64,
}

/// What a rebalance did.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// The plan.
    pub plan: PathBuf,
    /// Whether every migration switched, now or before (the exit status
    /// is 0 exactly then).
    pub ok: bool,
    /// Counts.
    pub totals: Totals,
    /// One per migration, in the plan's order.
    pub results: Vec<Outcome>,
}

impl Report {
    fn new(plan: &Plan, results: Vec<Outcome>, seconds: f64) -> Self {
        let count = |v| results.iter().filter(|o| o.result == v).count();
        let totals = Totals {
            migrations: results.len(),
            switched: count(Verdict::Switched),
            skipped: count(Verdict::Skipped),
            failed: count(Verdict::Failed),
            cancelled: count(Verdict::Cancelled),
            resumed: results.iter().filter(|o| o.resumed).count(),
            seconds,
        };
        Self {
            plan: plan.path.clone(),
            ok: totals.failed == 0 && totals.cancelled == 0,
            totals,
            results,
        }
    }
}

/// Why a migration could not start: the migration layer's refusals, and
/// what the disks say when nothing is attached.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    /// `live::start` refused or failed.
    #[error(transparent)]
    Migrate(#[from] MigrateError),
    /// The source carries a retire marker for another device.
    #[error("{source_path} is retired already: it switched to device {dev}, not to {target} (see `migrate status {source_path}`)",
        source_path = .source_path.display(), target = .target.display())]
    RetiredElsewhere {
        /// The source.
        source_path: PathBuf,
        /// The plan's target.
        target: PathBuf,
        /// The device the marker names ("MAJ:MIN").
        dev: String,
    },
    /// A switch was interrupted by a crash: neither device mounts.
    #[error("the switch of {source_path} to {target} was interrupted (a crash between the retire marker and the target's head): run `migrate recover {source_path} {target}`",
        source_path = .source_path.display(), target = .target.display())]
    InterruptedSwitch {
        /// The source.
        source_path: PathBuf,
        /// The target.
        target: PathBuf,
    },
}

impl From<Error> for LaunchError {
    fn from(e: Error) -> Self {
        LaunchError::Migrate(e.into())
    }
}

impl From<FilterError> for LaunchError {
    fn from(e: FilterError) -> Self {
        LaunchError::Migrate(e.into())
    }
}

/// A boxed future of a migration's end.
pub type Running = Pin<Box<dyn Future<Output = Result<Summary, MigrateError>> + Send>>;

/// A migration attached (or resumed) and ready to copy.
pub trait Prepared: Send {
    /// Whether it resumed an attached migration.
    fn resumed(&self) -> bool;
    /// Bytes of the source.
    fn bytes(&self) -> u64;
    /// Regions in all.
    fn regions(&self) -> u64;
    /// Runs it to the switch. Interrupted (`cancel`), it is abandoned.
    fn run(
        self: Box<Self>,
        opts: MigrateOptions,
        progress: Arc<Progress>,
        cancel: Arc<AtomicBool>,
    ) -> Running;
}

/// How a migration begins.
pub enum Launch {
    /// It has switched already: nothing to do (the reason says how we know).
    Switched(String),
    /// Ready to run.
    Ready(Box<dyn Prepared>),
}

/// Starts and abandons migrations: the live filter ([`LiveLauncher`]), or a
/// simulation in tests.
pub trait Launcher: Send + Sync {
    /// Attaches or resumes the migration `m`, or finds that it has
    /// switched already.
    fn launch(&self, m: &Planned, state_dir: &Path) -> Result<Launch, LaunchError>;
    /// Abandons `m` after it failed (before its switch): detaches blkmig.
    fn abandon(&self, m: &Planned, state_dir: &Path) -> Result<(), MigrateError>;
}

impl Prepared for live::Ready {
    fn resumed(&self) -> bool {
        matches!(self.begin, Begin::Resumed { .. })
    }

    fn bytes(&self) -> u64 {
        live::Ready::bytes(self)
    }

    fn regions(&self) -> u64 {
        live::Ready::regions(self)
    }

    fn run(
        self: Box<Self>,
        opts: MigrateOptions,
        progress: Arc<Progress>,
        cancel: Arc<AtomicBool>,
    ) -> Running {
        Box::pin((*self).run(opts, progress, cancel))
    }
}

/// Live migrations through the blkmig filter.
#[derive(Clone, Copy, Debug, Default)]
pub struct LiveLauncher;

/// Whether `m`'s source is gone (unplugged) after a switch onto `m`'s
/// target, as its state directory and the target's head say.
fn removed_after_switch(m: &Planned, state_dir: &Path) -> bool {
    !m.source.exists()
        && matches!(
            crate::recover::inspect(&m.source, Some(&m.target), state_dir),
            Ok(Finding::SourceRemoved { switched: true, .. })
        )
}

impl Launcher for LiveLauncher {
    fn launch(&self, m: &Planned, state_dir: &Path) -> Result<Launch, LaunchError> {
        let src = m.source.display();
        if removed_after_switch(m, state_dir) {
            return Ok(Launch::Switched(format!(
                "already switched: {src} was removed after its switch; {} holds the filesystem",
                m.target.display()
            )));
        }
        // Nothing attached: the source may have switched in an earlier run
        // and been detached since (or the machine rebooted). Attaching
        // again would copy a retired source over its own target.
        if let Err(FilterError::Refused {
            errno: libc::ENOENT,
            ..
        }) = Filtered::open(&m.source)?.status()
        {
            match crate::recover::inspect(&m.source, Some(&m.target), state_dir)? {
                Finding::SourceAuthoritative { .. } => {}
                Finding::TargetAuthoritative { marker, .. } | Finding::Retired { marker, .. } => {
                    let dev = Probe::new(&m.target)?.id;
                    let ours = matches!(dev, DevId::Block { major, minor }
                        if format!("{major}:{minor}") == marker.target_dev);
                    if !ours {
                        return Err(LaunchError::RetiredElsewhere {
                            source_path: m.source.clone(),
                            target: m.target.clone(),
                            dev: marker.target_dev,
                        });
                    }
                    return Ok(Launch::Switched(format!(
                        "already switched: {src} is retired and {} holds the filesystem (migration {:016x})",
                        m.target.display(),
                        marker.migration_id
                    )));
                }
                Finding::InterruptedSwitch { .. } => {
                    return Err(LaunchError::InterruptedSwitch {
                        source_path: m.source.clone(),
                        target: m.target.clone(),
                    })
                }
                // The source was just opened: it is not removed.
                Finding::SourceRemoved { .. } => {}
            }
        }
        Ok(match live::start(&m.request(), state_dir)? {
            Start::AlreadySwitched => Launch::Switched(format!(
                "already switched: blkmig redirects {src} to {}",
                m.target.display()
            )),
            Start::Ready(r) => Launch::Ready(r),
        })
    }

    fn abandon(&self, m: &Planned, state_dir: &Path) -> Result<(), MigrateError> {
        live::abort(&m.source)?;
        if let Ok(p) = Probe::new(&m.source) {
            crate::recover::record_abandoned(state_dir, p.id);
        }
        Ok(())
    }
}

/// Told about migrations as they start and end (the command shows
/// progress with it).
pub trait Observer: Send + Sync {
    /// Migration `index` of the plan is attached (or resumed) and copies.
    fn started(&self, index: usize, m: &Planned, resumed: bool, progress: Arc<Progress>);
    /// Migration `index` ended.
    fn finished(&self, index: usize, outcome: &Outcome);
}

/// An observer that is told nothing.
impl Observer for () {
    fn started(&self, _: usize, _: &Planned, _: bool, _: Arc<Progress>) {}
    fn finished(&self, _: usize, _: &Outcome) {}
}

/// An error and its sources in words, each once.
fn chain_text(e: &(dyn std::error::Error + 'static)) -> String {
    let mut words = vec![crate::error::describe(e)];
    let mut next = e.source();
    while let Some(s) = next {
        words.push(crate::error::describe(s));
        next = s.source();
    }
    words.join(": ")
}

fn is_cancel(e: &MigrateError) -> bool {
    e.is_interrupted() || matches!(e, MigrateError::Abandoned { .. })
}

/// Runs one migration to its outcome.
async fn one(
    m: Planned,
    state_dir: PathBuf,
    index: usize,
    launcher: Arc<dyn Launcher>,
    observer: Arc<dyn Observer>,
    shared_limit: Option<Arc<DefaultDirectRateLimiter>>,
    cancel: Arc<AtomicBool>,
) -> Outcome {
    let t0 = Instant::now();
    let mut out = Outcome {
        source: m.source.clone(),
        target: m.target.clone(),
        result: Verdict::Failed,
        resumed: false,
        reason: None,
        seconds: 0.0,
        migration: None,
    };
    let launched = {
        let (l, m, dir) = (launcher.clone(), m.clone(), state_dir.clone());
        tokio::task::spawn_blocking(move || l.launch(&m, &dir)).await
    };
    let ready = match launched {
        Ok(Ok(Launch::Ready(r))) => r,
        Ok(Ok(Launch::Switched(why))) => {
            out.result = Verdict::Skipped;
            out.reason = Some(why);
            return out;
        }
        Ok(Err(e)) => {
            // A failed migration of ours found attached: abandon it too.
            if let LaunchError::Migrate(e @ MigrateError::Failed(_)) = &e {
                out.reason = Some(abandoned(&failure_text(e), &*launcher, &m, &state_dir));
            } else {
                out.reason = Some(chain_text(&e));
            }
            out.seconds = t0.elapsed().as_secs_f64();
            return out;
        }
        Err(e) => {
            out.reason = Some(Error::joined(&e, "launch").to_string());
            return out;
        }
    };
    out.resumed = ready.resumed();
    let progress = Progress::migration(ready.bytes(), ready.regions());
    observer.started(index, &m, out.resumed, progress.clone());
    let o = &m.options;
    let opts = MigrateOptions {
        queue_depth: o.queue_depth,
        busy_queue_depth: crate::migration::BUSY_QUEUE_DEPTH,
        rate_limit: o.rate_limit,
        shared_limit,
        max_pause: o.max_pause,
        no_switch: false,
        hold_timeout_ms: u32::try_from(o.hold_timeout.as_millis()).unwrap_or(u32::MAX),
        state_dir: state_dir.clone(),
        compare: true,
        verify: o.verify,
        // A plan copies everything (free-space skipping is `migrate
        // start`'s).
        free_space: None,
    };
    match ready.run(opts, progress, cancel).await {
        Ok(s) if s.switched => {
            out.result = Verdict::Switched;
            out.migration = Some(s);
        }
        Ok(s) => {
            out.reason = Some("the migration ended without switching".to_owned());
            out.migration = Some(s);
        }
        Err(e) if is_cancel(&e) => {
            out.result = Verdict::Cancelled;
            out.reason = Some(chain_text(&e));
        }
        Err(e) => out.reason = Some(abandoned(&failure_text(&e), &*launcher, &m, &state_dir)),
    }
    out.seconds = t0.elapsed().as_secs_f64();
    out
}

/// What went wrong, without the advice the CLI gives with it (rerun,
/// abort): the runner abandons the migration itself.
fn failure_text(e: &MigrateError) -> String {
    match e {
        MigrateError::Stopped { cause, .. } => {
            format!("the copy stopped before the switch: {}", chain_text(cause))
        }
        MigrateError::Failed(why) => format!("the migration failed in the kernel: {why}"),
        e => chain_text(e),
    }
}

/// Abandons a failed migration; the reason says whether that worked.
fn abandoned(reason: &str, launcher: &dyn Launcher, m: &Planned, state_dir: &Path) -> String {
    match launcher.abandon(m, state_dir) {
        Ok(()) => format!("{reason}; abandoned: blkmig detached, the source is untouched"),
        Err(e) => format!(
            "{reason}; it could not be abandoned ({}): run `migrate abort {}`",
            chain_text(&e),
            m.source.display()
        ),
    }
}

/// Runs `plan`: at most `plan.concurrency` migrations at once, in the
/// plan's order, each to its end whatever the others do. Once `cancel` is
/// set, the running migrations are abandoned and no other starts.
pub async fn run(
    plan: &Plan,
    launcher: Arc<dyn Launcher>,
    observer: Arc<dyn Observer>,
    cancel: Arc<AtomicBool>,
) -> Report {
    let t0 = Instant::now();
    let shared = plan.shared_limit();
    let mut results: Vec<Option<Outcome>> = vec![None; plan.migrations.len()];
    let mut set = tokio::task::JoinSet::new();
    let mut index_of = HashMap::new();
    let mut next = 0;
    loop {
        while set.len() < plan.concurrency
            && next < plan.migrations.len()
            && !cancel.load(Ordering::Relaxed)
        {
            let h = set.spawn(one(
                plan.migrations[next].clone(),
                plan.state_dir.clone(),
                next,
                launcher.clone(),
                observer.clone(),
                shared.clone(),
                cancel.clone(),
            ));
            index_of.insert(h.id(), next);
            next += 1;
        }
        let Some(done) = set.join_next_with_id().await else {
            break;
        };
        let (i, outcome) = match done {
            Ok((id, o)) => (index_of[&id], o),
            Err(e) => {
                let i = index_of[&e.id()];
                let m = &plan.migrations[i];
                let o = Outcome {
                    source: m.source.clone(),
                    target: m.target.clone(),
                    result: Verdict::Failed,
                    resumed: false,
                    reason: Some(Error::joined(&e, "migration").to_string()),
                    seconds: 0.0,
                    migration: None,
                };
                (i, o)
            }
        };
        observer.finished(i, &outcome);
        results[i] = Some(outcome);
    }
    let results = results
        .into_iter()
        .zip(&plan.migrations)
        .map(|(o, m)| {
            o.unwrap_or_else(|| Outcome {
                source: m.source.clone(),
                target: m.target.clone(),
                result: Verdict::Cancelled,
                resumed: false,
                reason: Some("not started: interrupted".to_owned()),
                seconds: 0.0,
                migration: None,
            })
        })
        .collect();
    Report::new(plan, results, t0.elapsed().as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(text: &str) -> Result<Plan, PlanError> {
        Plan::from_json(text, Path::new("plan.json"))
    }

    fn refusal(text: &str) -> String {
        match plan(text) {
            Ok(p) => panic!("accepted: {p:?}"),
            Err(e) => chain_text(&e),
        }
    }

    #[test]
    fn a_plan_with_defaults_and_overrides() {
        let p = plan(
            r#"{
                "concurrency": 2,
                "total_rate_limit": "300M",
                "state_dir": "/keep/blkmig",
                "options": { "rate_limit": "200M", "max_pause": "250ms" },
                "migrations": [
                    { "source": "/dev/sdb", "target": "/dev/sdf" },
                    { "source": "/dev/sdc", "target": "/dev/sdg",
                      "options": { "max_pause": "1s", "region_size": "4M", "verify": true } }
                ]
            }"#,
        )
        .unwrap_or_else(|e| panic!("{}", chain_text(&e)));
        assert_eq!(p.concurrency, 2);
        assert_eq!(p.total_rate_limit, Some(Bytes(300 << 20)));
        assert_eq!(p.state_dir, Path::new("/keep/blkmig"));
        let (a, b) = (&p.migrations[0].options, &p.migrations[1].options);
        assert_eq!(a.rate_limit, Some(Bytes(200 << 20)));
        assert_eq!(a.max_pause, Duration::from_millis(250));
        assert_eq!(a.region_size, Bytes(1 << 20));
        assert!(!a.verify);
        assert_eq!(b.rate_limit, Some(Bytes(200 << 20)), "inherited");
        assert_eq!(b.max_pause, Duration::from_secs(1));
        assert_eq!(b.region_size, Bytes(4 << 20));
        assert!(b.verify);
    }

    #[test]
    fn defaults_are_those_of_migrate_start() {
        let p = plan(r#"{"migrations":[{"source":"/dev/a","target":"/dev/b"}]}"#)
            .unwrap_or_else(|e| panic!("{}", chain_text(&e)));
        assert_eq!(p.concurrency, 1);
        assert_eq!(p.total_rate_limit, None);
        assert_eq!(p.state_dir, Path::new(DEFAULT_STATE_DIR));
        assert_eq!(p.migrations[0].options, Options::default());
    }

    #[test]
    fn refusals_name_the_problem() {
        let one = r#""migrations":[{"source":"/dev/a","target":"/dev/b"}]"#;
        for (text, words) in [
            (
                format!(r#"{{"concurency": 2, {one}}}"#),
                "unknown field `concurency`",
            ),
            (
                r#"{"migrations":[{"source":"/dev/a","target":"/dev/b","rate":"1M"}]}"#.into(),
                "unknown field `rate`",
            ),
            (format!(r#"{{"concurrency": 0, {one}}}"#), "concurrency: must be at least 1"),
            (format!(r#"{{"concurrency": -1, {one}}}"#), "invalid value: integer `-1`"),
            (r#"{"migrations":[]}"#.into(), "migrations: the plan names no migration"),
            (r#"{"concurrency": 1}"#.into(), "missing field `migrations`"),
            (
                format!(r#"{{"options": {{"rate_limit": "fast"}}, {one}}}"#),
                "options.rate_limit: invalid size \"fast\"",
            ),
            (
                format!(r#"{{"options": {{"rate_limit": "0"}}, {one}}}"#),
                "options.rate_limit: invalid rate",
            ),
            (
                format!(r#"{{"total_rate_limit": "12 parsecs", {one}}}"#),
                "total_rate_limit: invalid size",
            ),
            (
                r#"{"migrations":[{"source":"/dev/a","target":"/dev/b","options":{"max_pause":"0ms"}}]}"#.into(),
                "migrations[0].options.max_pause: invalid duration \"0ms\": it must be more than zero",
            ),
            (
                format!(r#"{{"options": {{"hold_timeout": "2m"}}, {one}}}"#),
                "options.hold_timeout: invalid hold timeout",
            ),
            (
                format!(r#"{{"options": {{"region_size": "3M"}}, {one}}}"#),
                "options.region_size: invalid region size \"3M\": it must be a power of two",
            ),
            (
                format!(r#"{{"options": {{"queue_depth": 0}}, {one}}}"#),
                "options.queue_depth: 0 is out of range",
            ),
            (
                r#"{"migrations":[{"source":"/dev/a","target":"/dev/a"}]}"#.into(),
                "migrations[0].target: /dev/a is both the source and the target of one migration",
            ),
            (
                r#"{"migrations":[{"source":"/dev/a","target":"/dev/b"},{"source":"/dev/a","target":"/dev/c"}]}"#.into(),
                "migrations[1].source: /dev/a is named again (it is migrations[0].source already)",
            ),
            (
                r#"{"migrations":[{"source":"/dev/a","target":"/dev/b"},{"source":"/dev/c","target":"/dev/b"}]}"#.into(),
                "migrations[1].target: /dev/b is named again (it is migrations[0].target already)",
            ),
            (
                r#"{"migrations":[{"source":"/dev/a","target":"/dev/b"},{"source":"/dev/b","target":"/dev/c"}]}"#.into(),
                "migrations[1].source: /dev/b is named again (it is migrations[0].target already)",
            ),
            (r#"{"migrations": "#.into(), "EOF while parsing"),
        ] {
            let got = refusal(&text);
            assert!(got.contains(words), "{text}\n  got: {got}\n  want: {words}");
            assert!(got.contains("plan.json"), "{got}");
        }
    }

    #[test]
    fn the_report_counts_and_judges() {
        let p = plan(r#"{"migrations":[{"source":"/dev/a","target":"/dev/b"},{"source":"/dev/c","target":"/dev/d"}]}"#)
            .unwrap_or_else(|e| panic!("{}", chain_text(&e)));
        let o = |result, resumed| Outcome {
            source: "/dev/a".into(),
            target: "/dev/b".into(),
            result,
            resumed,
            reason: None,
            seconds: 1.0,
            migration: None,
        };
        let r = Report::new(
            &p,
            vec![o(Verdict::Switched, true), o(Verdict::Skipped, false)],
            2.0,
        );
        assert!(r.ok);
        assert_eq!(
            (r.totals.switched, r.totals.skipped, r.totals.resumed),
            (1, 1, 1)
        );
        let r = Report::new(
            &p,
            vec![o(Verdict::Switched, false), o(Verdict::Failed, false)],
            2.0,
        );
        assert!(!r.ok);
        let r = Report::new(
            &p,
            vec![o(Verdict::Switched, false), o(Verdict::Cancelled, false)],
            2.0,
        );
        assert!(!r.ok);
        let j = serde_json::to_value(&r).unwrap_or_default();
        assert_eq!(j["results"][1]["result"], "cancelled");
        assert_eq!(j["totals"]["cancelled"], 1);
    }
}
