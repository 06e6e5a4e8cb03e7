//! `migrate`: live migration of a block device (and offline copies).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use blkmig::copy::{self, CopyOptions};
use blkmig::core::abi::{self, Status};
use blkmig::device::{Access, Device};
use blkmig::filter::Filtered;
use blkmig::live::{self, AttachRequest, Attached, Begin, Start};
use blkmig::migration::{self, MigrateOptions};
use blkmig::progress::{Progress, Reporter, Style};
use blkmig::rebalance::{self, LiveLauncher, Observer, Outcome, Plan, Planned, Report, Verdict};
use blkmig::units::Bytes;
use clap::{Args, Parser, Subcommand};

/// A line for the operator on stderr; if stderr itself cannot be written,
/// there is nowhere left to say so.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

/// `migrate --version`: this version, the module ABI it speaks and the
/// kernel it needs.
static VERSION: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "{} (module ABI {}, Linux 6.12 with the blkmig block-device filter patches)",
        env!("CARGO_PKG_VERSION"),
        abi::ABI_VERSION
    )
});

/// What every exit status means (also in the man page).
const EXIT_STATUS: &str = "Exit status:
  0  success
  1  the operation failed (an I/O error, a refusal by the kernel, a failed
     or interrupted migration)
  2  usage error, or input refused before anything was changed: a bad
     option, an invalid plan, a device that is missing, not a block device
     (live commands), in use or already being migrated, too small or of
     unusable geometry";

const ABOUT: &str = "Move a live block device to another one, with no downtime";

#[derive(Parser)]
#[command(name = "migrate", version = VERSION.as_str(), about = ABOUT, after_help = EXIT_STATUS)]
struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    cmd: AnyCmd,
}

/// `migrate` as the man pages and completions show it: without the
/// commands only packaging uses.
#[derive(Parser)]
#[command(name = "migrate", version = VERSION.as_str(), about = ABOUT, after_help = EXIT_STATUS)]
struct Documented {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Args)]
struct Global {
    /// Log more (repeat for more detail); RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
}

#[derive(Subcommand)]
enum AnyCmd {
    #[command(flatten)]
    Documented(Cmd),
    /// Write the man pages and the shell completions into OUTDIR (man/,
    /// completions/), for packaging.
    #[command(hide = true)]
    Assets {
        /// Where to write them.
        outdir: PathBuf,
    },
}

#[derive(Subcommand)]
enum Cmd {
    /// Copy an unmounted device or image file to another one.
    Copy(CopyArgs),
    /// Live-migrate SOURCE to TARGET: attach, copy, switch (resumes a
    /// migration that is already attached).
    Start(StartArgs),
    /// Abandon the migration of SOURCE (CLONE mode only): detach the
    /// filter; the source stays as it is.
    Abort {
        /// The filtered source device.
        source: PathBuf,
    },
    /// Live-migrate many devices from a plan (JSON): at most N at once,
    /// going on when one fails, with a report per device. Run again, it
    /// resumes what is attached and skips what has switched. Exit status:
    /// 0 when every migration switched (now or before), 1 when any failed
    /// or was interrupted, 2 when the plan is refused (nothing started).
    Rebalance(RebalanceArgs),
    /// Attach the blkmig filter to a live source, with TARGET as its target.
    Attach(AttachArgs),
    /// Detach the blkmig filter (in CLONE mode: abandons the migration).
    Detach {
        /// The filtered source device.
        source: PathBuf,
    },
    /// List the block devices blkmig has to do with: each one with a filter
    /// attached (mode, target, progress) and, with no filter, each retired
    /// source, interrupted switch or interrupted copy found on the disks.
    List {
        /// Also list devices with nothing of blkmig on them (and those that
        /// could not be read).
        #[arg(long)]
        all: bool,
        /// Where `migrate start` saved the sources' heads.
        #[arg(long, default_value = "/var/lib/blkmig")]
        state_dir: PathBuf,
        /// One JSON object on stdout, for automation.
        #[arg(long)]
        json: bool,
    },
    /// Show the state of the migration of SOURCE. With no filter attached
    /// (after a reboot), say what the disks hold: a retired source and its
    /// saved head, an interrupted switch, or a source that is authoritative.
    Status {
        /// The source device.
        source: PathBuf,
        /// The target, to tell a completed switch from an interrupted one
        /// when no filter is attached.
        #[arg(long)]
        target: Option<PathBuf>,
        /// Where `migrate start` saved the source's head.
        #[arg(long, default_value = "/var/lib/blkmig")]
        state_dir: PathBuf,
        /// One JSON object on stdout, for automation.
        #[arg(long)]
        json: bool,
    },
    /// After a crash inside the switch (the source retired, the target's
    /// head not yet written; neither device mountable): write the saved
    /// head to TARGET, which then holds the filesystem, or with --rollback
    /// back to SOURCE. Changes nothing in any other state.
    Recover {
        /// The retired source.
        source: PathBuf,
        /// The migration's target.
        target: PathBuf,
        /// Put the source back instead of finishing on the target.
        #[arg(long)]
        rollback: bool,
        /// Where `migrate start` saved the source's head.
        #[arg(long, default_value = "/var/lib/blkmig")]
        state_dir: PathBuf,
    },
}

#[derive(Args)]
struct ProgressArgs {
    /// Progress as JSON lines on stdout (stable field names, integer bytes).
    #[arg(long)]
    json: bool,
    /// No progress output.
    #[arg(short, long, conflicts_with = "json")]
    quiet: bool,
    /// Seconds between plain or JSON progress lines.
    #[arg(short = 'i', long, default_value = "1", value_parser = positive_seconds)]
    interval: Duration,
}

#[derive(Args)]
struct CopyArgs {
    /// Source device or image file.
    source: PathBuf,
    /// Target device or image file (at least as large as the source).
    target: PathBuf,
    /// Region size: unit of copying and checksums (power of two, 4K..1G).
    /// 4 MiB I/Os keep a disk busier than smaller ones (docs/benchmarks.md).
    #[arg(long, default_value = "4M")]
    region_size: Bytes,
    /// Regions in flight at once.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..=256))]
    queue_depth: u16,
    /// Limit the copy to this many bytes per second (e.g. 200M, at least 1K).
    #[arg(long, value_parser = blkmig::units::parse_rate)]
    rate_limit: Option<Bytes>,
    /// Read the target back and compare crc32 checksums with the source's.
    #[arg(long)]
    verify: bool,
    /// Turn all-zero regions into holes (files) or write-zeroes (devices).
    #[arg(long)]
    sparse: bool,
    #[command(flatten)]
    progress: ProgressArgs,
}

#[derive(Args)]
struct StartArgs {
    #[command(flatten)]
    attach: AttachArgs,
    /// Regions copied at once while nothing writes to the source.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..=256))]
    queue_depth: u16,
    /// Regions copied at once while something writes to the source (at
    /// most --queue-depth): the applications' I/O queues behind fewer
    /// copies. Equal to --queue-depth: the copy never yields.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=256))]
    busy_queue_depth: u16,
    /// Limit the background copy to this many bytes per second (e.g. 200M,
    /// at least 1K).
    #[arg(long, value_parser = blkmig::units::parse_rate)]
    rate_limit: Option<Bytes>,
    /// Switch only when the estimated pause of writes fits this budget, and
    /// never hold writes longer: each switch attempt's hold ends within it.
    /// It must exceed the time the switch takes to copy the last region
    /// (region size / copy rate) and do its own work (flushes, the retire
    /// marker, the target's head).
    #[arg(long, default_value = "100ms", value_parser = blkmig::units::parse_positive_duration)]
    max_pause: Duration,
    /// Copy and keep mirroring, but do not switch (rerun without it to switch).
    #[arg(long)]
    no_switch: bool,
    /// Before the switch, compare every region on both devices; copy again
    /// what differs, and do not switch over a region that differs twice.
    #[arg(long, conflicts_with = "no_switch")]
    verify: bool,
    /// Copy every region, even those the filesystem mounted from the
    /// source does not use (by default they are committed without a copy).
    #[arg(long)]
    full_copy: bool,
    /// Where the source's first region is saved before it is retired.
    #[arg(long, default_value = "/var/lib/blkmig")]
    state_dir: PathBuf,
    #[command(flatten)]
    progress: ProgressArgs,
}

#[derive(Args)]
struct RebalanceArgs {
    /// The plan: a JSON file (see docs/operations.md, "Rebalance many
    /// devices").
    plan: PathBuf,
    /// The report as one JSON object on stdout (progress stays on stderr).
    #[arg(long)]
    json: bool,
    /// No progress lines.
    #[arg(short, long)]
    quiet: bool,
    /// Seconds between progress lines (one per running migration).
    #[arg(short = 'i', long, default_value = "5", value_parser = positive_seconds)]
    interval: Duration,
    /// Check the plan and its devices, and start nothing.
    #[arg(long)]
    check: bool,
}

#[derive(Args)]
struct AttachArgs {
    /// The live source block device.
    source: PathBuf,
    /// The target block device (unused, at least as large as the source).
    target: PathBuf,
    /// Region size (power of two, 4K..1G, a multiple of the block size).
    #[arg(long, default_value = "1M")]
    region_size: Bytes,
    /// How long writes may be held for one switch attempt (e.g. 5s, 800ms;
    /// at most 60s): the kernel then releases them and cancels the switch.
    #[arg(long, default_value = "5s", value_parser = blkmig::units::parse_hold_timeout)]
    hold_timeout: Duration,
    /// The hold timeout in milliseconds (older spelling of --hold-timeout).
    #[arg(long, hide = true, conflicts_with = "hold_timeout",
        value_parser = clap::value_parser!(u32).range(1..=abi::HOLD_TIMEOUT_MS_MAX as i64))]
    hold_timeout_ms: Option<u32>,
}

impl AttachArgs {
    /// The hold timeout in milliseconds, from either spelling.
    fn hold_timeout_ms(&self) -> u32 {
        self.hold_timeout_ms
            .unwrap_or_else(|| u32::try_from(self.hold_timeout.as_millis()).unwrap_or(u32::MAX))
    }
}

fn style(p: &ProgressArgs) -> Style {
    if p.quiet {
        Style::Quiet
    } else if p.json {
        Style::Json
    } else {
        Style::Auto
    }
}

/// `--interval`: a positive number of seconds.
fn positive_seconds(s: &str) -> Result<Duration, String> {
    s.parse::<f64>()
        .ok()
        .and_then(|secs| Duration::try_from_secs_f64(secs).ok())
        .filter(|d| !d.is_zero())
        .ok_or_else(|| format!("{s:?} is not a positive number of seconds"))
}

/// A flag that SIGINT and SIGTERM set. The handler only stores to the
/// flag (no sockets, no threads), so it works on any kernel.
fn cancel_on_ctrl_c() -> Result<Arc<AtomicBool>> {
    let cancel = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, cancel.clone())
            .context("cannot install a signal handler")?;
    }
    Ok(cancel)
}

async fn cmd_copy(a: CopyArgs) -> Result<()> {
    let (sp, tp) = live::probe_pair(&a.source, &a.target)?;
    sp.check_unused()?;
    tp.check_unused()?;
    let access = |write| Access {
        write,
        direct: true,
        exclusive: true,
    };
    let src = Arc::new(Device::open(&sp, access(false))?);
    let tgt = Arc::new(Device::open(&tp, access(true))?);
    copy::check_target_size(&src, &tgt)?;
    copy::geometry(&src, &tgt, a.region_size)?;
    let opts = CopyOptions {
        region_size: a.region_size,
        queue_depth: a.queue_depth.into(),
        rate_limit: a.rate_limit,
        sparse: a.sparse,
    };
    let (style, every) = (style(&a.progress), a.progress.interval);
    tracing::info!(source = %a.source.display(), target = %a.target.display(),
        size = src.size().0, region = opts.region_size.0, depth = opts.queue_depth, "copy starts");
    let cancel = cancel_on_ctrl_c()?;
    let progress = Progress::new("copy", src.size().0);
    let rep = Reporter::start(progress.clone(), style, every);
    let res = copy::copy(src.clone(), tgt.clone(), &opts, progress, cancel.clone()).await;
    let shown = rep.finish(res.is_ok()).await;
    let report = res?;
    shown.context("cannot write progress to standard output")?;
    let mut verified = None;
    if a.verify {
        let progress = Progress::new("verify", src.size().0);
        let rep = Reporter::start(progress.clone(), style, every);
        let res = copy::verify(
            src.clone(),
            tgt.clone(),
            opts.region_size,
            Arc::new(report.checksums.clone()),
            opts.queue_depth,
            progress,
            cancel,
        )
        .await;
        let shown = rep.finish(res.is_ok()).await;
        verified = Some(res?);
        shown.context("cannot write progress to standard output")?;
    }
    let rate = report.bytes_total as f64 / report.seconds.max(1e-9);
    if style == Style::Json {
        let j = blkmig::output::versioned(serde_json::json!({
            "event": "done",
            "bytes_total": report.bytes_total,
            "bytes_written": report.bytes_written,
            "bytes_zeroed": report.bytes_zeroed,
            "regions": report.regions,
            "seconds": report.seconds,
            "rate_bytes_per_sec": rate as u64,
            "verified": verified.is_some(),
            "verify_seconds": verified.as_ref().map(|v| v.seconds),
        }));
        out(&j.to_string())?;
    } else if style != Style::Quiet {
        say!(
            "copied {} ({} bytes) in {:.2}s, {}/s; {} written, {} zeroed{}",
            Bytes(report.bytes_total),
            report.bytes_total,
            report.seconds,
            Bytes(rate as u64),
            Bytes(report.bytes_written),
            Bytes(report.bytes_zeroed),
            match &verified {
                Some(v) => format!("; verified {} regions in {:.2}s", v.regions, v.seconds),
                None => String::new(),
            }
        );
    }
    Ok(())
}

impl AttachArgs {
    fn request(&self) -> AttachRequest {
        AttachRequest {
            source: self.source.clone(),
            target: self.target.clone(),
            region_size: self.region_size,
            hold_timeout_ms: self.hold_timeout_ms(),
        }
    }
}

fn print_attached(a: &AttachArgs, at: &Attached) {
    say!(
        "blkmig attached to {} (target {}, {} regions of {})",
        a.source.display(),
        a.target.display(),
        at.regions,
        Bytes(at.region_bytes)
    );
}

fn cmd_attach(a: AttachArgs) -> Result<()> {
    let at = live::attach(&a.request())?;
    print_attached(&a, &at);
    Ok(())
}

/// The free space of the filesystem mounted from the source, unless
/// `--full-copy` (or nothing is mounted from it: a full copy).
fn free_space(a: &StartArgs) -> Option<Arc<dyn blkmig::fsmap::FreeSpace>> {
    if a.full_copy {
        return None;
    }
    let f = blkmig::fsmap::Fsmap::for_source(&a.attach.source)?;
    say!(
        "the free space of the filesystem on {} is not copied (--full-copy copies it)",
        f.mount().display()
    );
    Some(Arc::new(f))
}

async fn cmd_start(a: StartArgs) -> Result<()> {
    let src = a.attach.source.display();
    let ready = match live::start(&a.attach.request(), &a.state_dir)? {
        Start::AlreadySwitched => {
            say!(
                "{src} has already switched to {}: nothing to do",
                a.attach.target.display()
            );
            return Ok(());
        }
        Start::Ready(r) => r,
    };
    match &ready.begin {
        Begin::Attached(at) => print_attached(&a.attach, at),
        Begin::Resumed { synced, total } => {
            say!("resuming the migration of {src}: {synced} of {total} regions in sync")
        }
    }
    let cancel = cancel_on_ctrl_c()?;
    let progress = Progress::migration(ready.bytes(), ready.regions());
    let style = style(&a.progress);
    let rep = Reporter::start(progress.clone(), style, a.progress.interval);
    let opts = MigrateOptions {
        queue_depth: a.queue_depth.into(),
        busy_queue_depth: a.busy_queue_depth.into(),
        rate_limit: a.rate_limit,
        shared_limit: None,
        max_pause: a.max_pause,
        no_switch: a.no_switch,
        hold_timeout_ms: a.attach.hold_timeout_ms(),
        state_dir: a.state_dir.clone(),
        compare: true,
        verify: a.verify,
        free_space: free_space(&a),
    };
    let res = ready.run(opts, progress, cancel).await;
    let shown = rep.finish(res.is_ok()).await;
    let summary = res?;
    shown.context("cannot write progress to standard output")?;
    if style == Style::Json {
        out(&blkmig::output::start_done(&summary).to_string())?;
    }
    if style != Style::Quiet {
        say!(
            "copied {} in {:.1}s ({} already on the target, {} free space skipped, {} zeroed, {} re-copies, {} busy, {} rounds); {}",
            Bytes(summary.bytes_copied),
            summary.seconds,
            Bytes(summary.bytes_matched),
            Bytes(summary.bytes_skipped_free),
            Bytes(summary.bytes_zeroed),
            summary.recopies,
            summary.busy,
            summary.rounds,
            summary.pause_text(),
        );
        if a.verify {
            say!(
                "verified {} regions ({} compared), {} left unverified (written continuously); {} differed on the target and were copied again{}",
                summary.regions_verified,
                Bytes(summary.bytes_verified),
                summary.regions_unverified,
                summary.verify_mismatches,
                if summary.mismatched_regions.is_empty() {
                    String::new()
                } else {
                    format!(" (regions {:?})", summary.mismatched_regions)
                }
            );
        }
        if summary.switched {
            say!(
                "switched: all I/O to {src} now goes to {tgt}; {src} is retired (its head is saved in {saved}).\n\
                 Remount from {tgt} when convenient, then run `migrate detach {src}`.",
                src = a.attach.source.display(),
                tgt = a.attach.target.display(),
                saved = summary.saved_head.as_deref().unwrap_or(Path::new("?")).display(),
            );
        } else {
            say!(
                "in sync and mirroring; run `migrate start {} {}` again to switch",
                a.attach.source.display(),
                a.attach.target.display()
            );
        }
    }
    Ok(())
}

/// Shows the migrations of a rebalance as they start and end, and a
/// progress line per running migration every interval (plain lines on
/// stderr, each naming its source: nothing to tear with N at once).
struct RebalanceView {
    running: Mutex<BTreeMap<usize, (PathBuf, Arc<Progress>)>>,
    quiet: bool,
}

impl Observer for RebalanceView {
    fn started(&self, index: usize, m: &Planned, resumed: bool, progress: Arc<Progress>) {
        if !self.quiet {
            say!(
                "{} -> {}: {}",
                m.source.display(),
                m.target.display(),
                if resumed {
                    "resumed"
                } else {
                    "attached, copying"
                }
            );
        }
        self.lock().insert(index, (m.source.clone(), progress));
    }

    fn finished(&self, index: usize, outcome: &Outcome) {
        self.lock().remove(&index);
        if !self.quiet {
            say!("{}", outcome_line(outcome));
        }
    }
}

impl RebalanceView {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<usize, (PathBuf, Arc<Progress>)>> {
        self.running.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn show_progress(&self) {
        for (src, p) in self.lock().values() {
            say!("{}: {}", src.display(), p.sample().line());
        }
    }
}

/// One migration's result in a line: `SRC -> TGT: switched in 12.3s (...)`.
fn outcome_line(o: &Outcome) -> String {
    let head = format!("{} -> {}", o.source.display(), o.target.display());
    let resumed = if o.resumed { ", resumed" } else { "" };
    match (o.result, &o.migration) {
        (Verdict::Switched, Some(s)) => format!(
            "{head}: switched in {:.1}s{resumed} (copied {}, {} already on the target; {})",
            o.seconds,
            Bytes(s.bytes_copied),
            Bytes(s.bytes_matched),
            s.pause_text()
        ),
        (v, _) => format!(
            "{head}: {}{resumed}: {}",
            match v {
                Verdict::Switched => "switched",
                Verdict::Skipped => "skipped",
                Verdict::Failed => "failed",
                Verdict::Cancelled => "cancelled",
            },
            o.reason.as_deref().unwrap_or("no reason given")
        ),
    }
}

fn report_text(r: &Report) -> String {
    let mut t: Vec<String> = r.results.iter().map(outcome_line).collect();
    let n = &r.totals;
    t.push(format!(
        "rebalance {}: {} migrations: {} switched, {} skipped (switched before), {} failed, {} cancelled ({} resumed) in {:.1}s",
        r.plan.display(),
        n.migrations,
        n.switched,
        n.skipped,
        n.failed,
        n.cancelled,
        n.resumed,
        n.seconds
    ));
    t.join("\n")
}

async fn cmd_rebalance(a: RebalanceArgs) -> Result<ExitCode> {
    let every = a.interval;
    let plan = match Plan::load(&a.plan).and_then(|p| p.check_devices().map(|()| p)) {
        Ok(p) => p,
        Err(e) => {
            report_error(&anyhow::Error::new(e));
            return Ok(ExitCode::from(EXIT_REFUSED));
        }
    };
    if a.check {
        say!(
            "the plan {} is valid: {} migrations, at most {} at once; nothing was started",
            plan.path.display(),
            plan.migrations.len(),
            plan.concurrency
        );
        return Ok(ExitCode::SUCCESS);
    }
    let cancel = cancel_on_ctrl_c()?;
    let view = Arc::new(RebalanceView {
        running: Mutex::new(BTreeMap::new()),
        quiet: a.quiet,
    });
    let ticker = (!a.quiet).then(|| {
        let view = view.clone();
        tokio::spawn(async move {
            let mut t = tokio::time::interval(every);
            t.tick().await;
            loop {
                t.tick().await;
                view.show_progress();
            }
        })
    });
    let report = rebalance::run(&plan, Arc::new(LiveLauncher), view, cancel).await;
    if let Some(t) = ticker {
        t.abort();
    }
    if a.json {
        out(&blkmig::output::rebalance(&report).to_string())?;
    } else {
        out(&report_text(&report))?;
    }
    Ok(if report.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn cmd_detach(source: &Path) -> Result<()> {
    live::detach(source)?;
    say!("blkmig detached from {}", source.display());
    Ok(())
}

fn cmd_abort(source: &Path) -> Result<()> {
    live::abort(source)?;
    say!(
        "migration of {} abandoned; blkmig detached, the source is untouched",
        source.display()
    );
    Ok(())
}

use migration::mode_name;

fn status_text(source: &Path, st: &Status) -> String {
    let pct = blkmig::output::synced_percent(st);
    let mut t = format!(
        "source:  {} ({})\n",
        source.display(),
        Bytes(st.source_sectors << 9)
    );
    t += &format!(
        "target:  {}:{} ({})\n",
        st.target_major,
        st.target_minor,
        Bytes(st.target_sectors << 9)
    );
    t += &format!(
        "mode:    {}{}\n",
        mode_name(st.mode),
        if st.flags & abi::STATUS_HOLDING != 0 {
            " (writes held)"
        } else {
            ""
        }
    );
    t += &format!(
        "synced:  {} of {} regions of {} ({pct:.1}%)\n",
        st.regions_synced,
        st.regions_total,
        Bytes(1 << st.region_shift)
    );
    t += &format!(
        "writes:  {} seen, {} mirrored, {} held\n",
        st.writes_seen, st.writes_mirrored, st.writes_held
    );
    t += &format!(
        "copies:  {} conflicts, {} busy\n",
        st.copy_conflicts, st.copy_busy
    );
    t += &format!(
        "holds:   {}, the longest {:.1} ms\n",
        st.holds,
        st.hold_longest_ns as f64 / 1e6
    );
    if st.region_holds > 0 {
        t += &format!(
            "regions: {} held for a copy, {} writes waited, the longest {:.1} ms\n",
            st.region_holds,
            st.region_writes_held,
            st.region_hold_longest_ns as f64 / 1e6
        );
    }
    t += &format!("id:      {:016x}\n", st.migration_id);
    if st.failure != 0 {
        t += &format!("failure: {}\n", migration::failure_text(st));
    }
    if st.flags & abi::STATUS_RETIRE_FAILED != 0 {
        t += "warning: the retire marker could not be confirmed: the source may still look like the filesystem; do not mount it\n";
    }
    if st.flags & abi::STATUS_TARGET_HEAD_DIRTY != 0 {
        t += "warning: the target's head may hold part of the filesystem's: wipe its first 128 KiB before reusing it\n";
    }
    t
}

/// `migrate status` with no filter attached: what the disks hold, in words.
fn offline_text(
    source: &Path,
    target: Option<&Path>,
    state_dir: &Path,
    finding: &blkmig::recover::Finding,
) -> String {
    use blkmig::recover::Finding;
    use std::fmt::Write;
    let src = source.display();
    let saved = |p: &Option<PathBuf>| match p {
        Some(p) => format!("its head is saved in {}", p.display()),
        None => format!("its saved head is not in {}", state_dir.display()),
    };
    let mut t = String::new();
    if !matches!(finding, Finding::SourceRemoved { .. }) {
        let _ = writeln!(t, "source:  {src} (blkmig not attached)");
    }
    match finding {
        Finding::SourceRemoved {
            source_dev,
            target,
            switched,
            mounts,
        } => {
            let tgt = target.display();
            let _ = writeln!(t, "source:  {src} (removed; it was device {source_dev})");
            let on = mounts
                .iter()
                .map(|m| m.display().to_string())
                .collect::<Vec<_>>()
                .join(", ");
            let _ = match (switched, mounts.is_empty()) {
                (true, false) => writeln!(
                    t,
                    "state:   source removed, served by {tgt}: the filesystem still mounted on {on} lives on {tgt},
         and blkmig serves it from there until it is unmounted. Mount {tgt} from then on."
                ),
                (true, true) => writeln!(
                    t,
                    "state:   source removed; {tgt} holds the filesystem (the switch completed)"
                ),
                (false, _) => writeln!(
                    t,
                    "state:   source removed before its migration switched: {tgt} holds no filesystem{}",
                    if mounts.is_empty() {
                        String::new()
                    } else {
                        format!(", and the filesystem still mounted on {on} lost its disk")
                    }
                ),
            };
        }
        Finding::SourceAuthoritative { started: None } => {
            let _ = writeln!(
                t,
                "state:   {src} holds the filesystem; no migration of it is recorded"
            );
        }
        Finding::SourceAuthoritative { started: Some(r) } => {
            let _ = writeln!(
                t,
                "state:   {src} holds the filesystem. A migration to {} (device {}) started and did not switch:
         the target is half-copied and no tool recognises it. Run `migrate start {src} {}` to start again
         (regions already on the target are compared, not copied), or reuse the target.",
                r.target.display(),
                r.target_dev,
                r.target.display()
            );
        }
        Finding::Retired { marker, saved_head } => {
            let _ = writeln!(
                t,
                "state:   {src} is retired: it switched to device {} ({} bytes) at {} (migration {:016x}); {}.
         Name the target (--target) to check that it holds the filesystem.",
                marker.target_dev,
                marker.target_bytes,
                marker.switched_at,
                marker.migration_id,
                saved(saved_head)
            );
        }
        Finding::TargetAuthoritative { marker, saved_head } => {
            let _ = writeln!(
                t,
                "state:   the switch completed: {} holds the filesystem; {src} is retired (migration {:016x}; {}).",
                target.unwrap_or(Path::new("?")).display(),
                marker.migration_id,
                saved(saved_head)
            );
        }
        Finding::InterruptedSwitch { marker, saved_head } => {
            let tgt = target.unwrap_or(Path::new("?")).display();
            let _ = writeln!(
                t,
                "state:   the switch was interrupted: {src} is retired and the head of {tgt} is not written yet;
         neither device is mountable now (migration {:016x}; {}).
         Run `migrate recover {src} {tgt}` to finish on {tgt}, or add --rollback to go back to {src}.",
                marker.migration_id,
                saved(saved_head)
            );
        }
    }
    t.trim_end().to_owned()
}

fn cmd_recover(source: &Path, target: &Path, state_dir: &Path, rollback: bool) -> Result<()> {
    use blkmig::recover::Recovered;
    if let Ok(st) = Filtered::open(source).and_then(|f| f.status()) {
        return Err(Refused(format!(
            "blkmig is attached to {} ({} mode): the migration is live, there is nothing to recover (see `migrate status`)",
            source.display(),
            migration::mode_name(st.mode)
        ))
        .into());
    }
    match blkmig::recover::recover(source, target, state_dir, rollback)? {
        Recovered::Finished => say!(
            "{} holds the filesystem now (its head is written); {} stays retired",
            target.display(),
            source.display()
        ),
        Recovered::RolledBack => say!(
            "{} holds the filesystem again (its head is back); {} is not recognisable",
            source.display(),
            target.display()
        ),
    }
    Ok(())
}

fn cmd_status(source: &Path, target: Option<&Path>, state_dir: &Path, json: bool) -> Result<()> {
    use blkmig::list::Look;
    let look = blkmig::list::look(source, target, state_dir)?;
    match &look {
        Look::Live(st) => warn_abi(st),
        Look::Offline(_) => warn_module_abi(),
    }
    if json {
        return out(&look.json().to_string());
    }
    out(&match &look {
        Look::Live(st) => status_text(source, st).trim_end().to_owned(),
        Look::Offline(f) => offline_text(source, target, state_dir, f),
    })
}

/// Warns when the module that answered speaks another ABI.
fn warn_abi(st: &Status) {
    if let Some(w) = blkmig::list::abi_warning(st) {
        say!("migrate: warning: {w}");
    }
}

/// Warns when the loaded module says (its version) it speaks another ABI,
/// with no filter to answer.
fn warn_module_abi() {
    if let Some(w) = blkmig::filter::module_abi().and_then(blkmig::list::abi_mismatch) {
        say!("migrate: warning: {w}");
    }
}

fn cmd_list(all: bool, state_dir: &Path, json: bool) -> Result<()> {
    use blkmig::list::{Found, Look};
    let entries: Vec<_> = blkmig::list::list(state_dir)
        .into_iter()
        .filter(|e| all || e.ours())
        .collect();
    if let Some(st) = entries.iter().find_map(|e| match &e.found {
        Found::Look {
            look: Look::Live(st),
            ..
        } => Some(st),
        _ => None,
    }) {
        warn_abi(st);
    } else {
        warn_module_abi();
    }
    if json {
        return out(&blkmig::list::json(&entries).to_string());
    }
    if entries.is_empty() {
        say!(
            "no block device has a blkmig filter attached or a migration on its disk{}",
            if all {
                ""
            } else {
                " (--all lists every device)"
            }
        );
        return Ok(());
    }
    let mut rows = vec![[
        "DEVICE".to_owned(),
        "STATE".to_owned(),
        "TARGET".to_owned(),
        "PROGRESS".to_owned(),
    ]];
    for e in &entries {
        let target = match &e.found {
            Found::Look {
                target: Some(t), ..
            } => t.display().to_string(),
            Found::Look {
                look: Look::Live(st),
                ..
            } => format!("{}:{}", st.target_major, st.target_minor),
            _ => "-".to_owned(),
        };
        rows.push([
            e.device.display().to_string(),
            e.state().to_owned(),
            target,
            list_detail(e),
        ]);
    }
    let w: Vec<usize> = (0..3)
        .map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0))
        .collect();
    let lines: Vec<String> = rows
        .iter()
        .map(|r| {
            format!(
                "{:w0$}  {:w1$}  {:w2$}  {}",
                r[0],
                r[1],
                r[2],
                r[3],
                w0 = w[0],
                w1 = w[1],
                w2 = w[2]
            )
            .trim_end()
            .to_owned()
        })
        .collect();
    out(&lines.join("\n"))
}

/// The last column of `migrate list`: progress, or what the disks say.
fn list_detail(e: &blkmig::list::Entry) -> String {
    use blkmig::list::{Found, Look};
    use blkmig::recover::Finding;
    let saved = |p: &Option<PathBuf>| match p {
        Some(p) => format!("head saved in {}", p.display()),
        None => "saved head not found".to_owned(),
    };
    match &e.found {
        Found::Look {
            look: Look::Live(st),
            ..
        } => {
            let mut t = format!(
                "{} of {} regions in sync ({}%), {} of {}",
                st.regions_synced,
                st.regions_total,
                blkmig::output::synced_percent(st),
                Bytes(st.regions_synced.saturating_mul(1 << st.region_shift).min(st.source_sectors << 9)),
                Bytes(st.source_sectors << 9)
            );
            if st.failure != 0 {
                t += &format!("; failure: {}", migration::failure_text(st));
            }
            t
        }
        Found::Look {
            look: Look::Offline(f),
            target,
        } => match f {
            Finding::SourceAuthoritative { started: Some(r) } => format!(
                "started (migration {:016x}) and not switched: the source holds the filesystem; `migrate start` again",
                r.migration_id
            ),
            Finding::SourceAuthoritative { started: None } => "-".to_owned(),
            Finding::Retired { marker, saved_head } => format!(
                "retired for device {} (target not found); {}",
                marker.target_dev,
                saved(saved_head)
            ),
            Finding::TargetAuthoritative { saved_head, .. } => {
                format!("the target holds the filesystem; {}", saved(saved_head))
            }
            Finding::InterruptedSwitch { saved_head, .. } => format!(
                "neither device mountable: `migrate recover {} {}`; {}",
                e.device.display(),
                target.as_deref().unwrap_or(Path::new("TARGET")).display(),
                saved(saved_head)
            ),
            Finding::SourceRemoved { target, .. } => format!("removed; target {}", target.display()),
        },
        Found::Error(err) => err.clone(),
    }
}

/// Writes `line` to standard output: a closed pipe or a full disk is an
/// error to report, not a panic.
fn out(line: &str) -> Result<()> {
    use std::io::Write;
    let mut o = std::io::stdout().lock();
    writeln!(o, "{line}")
        .and_then(|()| o.flush())
        .context("cannot write to standard output")
}

fn init_tracing(verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(blkmig::progress::LogWriter)
        .init();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(cli.global.verbose);
    // Only the commands that copy need the async runtime.
    let runtime = || {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .context("cannot start the async runtime")
    };
    let cmd = match cli.cmd {
        AnyCmd::Documented(cmd) => cmd,
        AnyCmd::Assets { outdir } => return exit(write_assets(&outdir)),
    };
    let res = match cmd {
        Cmd::Rebalance(a) => {
            return runtime()
                .and_then(|rt| rt.block_on(cmd_rebalance(a)))
                .unwrap_or_else(|e| {
                    report_error(&e);
                    ExitCode::from(exit_status(&e))
                })
        }
        Cmd::Copy(a) => runtime().and_then(|rt| rt.block_on(cmd_copy(a))),
        Cmd::Start(a) => runtime().and_then(|rt| rt.block_on(cmd_start(a))),
        Cmd::Abort { source } => cmd_abort(&source),
        Cmd::Attach(a) => cmd_attach(a),
        Cmd::Detach { source } => cmd_detach(&source),
        Cmd::Status {
            source,
            target,
            state_dir,
            json,
        } => cmd_status(&source, target.as_deref(), &state_dir, json),
        Cmd::List {
            all,
            state_dir,
            json,
        } => cmd_list(all, &state_dir, json),
        Cmd::Recover {
            source,
            target,
            rollback,
            state_dir,
        } => cmd_recover(&source, &target, &state_dir, rollback),
    };
    exit(res)
}

/// The exit status of a command's result, its error reported.
fn exit(res: Result<()>) -> ExitCode {
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            report_error(&e);
            ExitCode::from(exit_status(&e))
        }
    }
}

/// Exit status of a refused command line or input: nothing was changed.
const EXIT_REFUSED: u8 = 2;

/// A refusal `main` words itself (exits with [`EXIT_REFUSED`]).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Refused(String);

/// The exit status of a failed command: [`EXIT_REFUSED`] when the input
/// was refused before anything was changed (see [`EXIT_STATUS`]), else 1.
fn exit_status(e: &anyhow::Error) -> u8 {
    use blkmig::error::{Error, Op};
    use blkmig::filter::FilterError;
    use blkmig::migration::MigrateError;
    use blkmig::recover::RecoverError;
    let missing = |e: &std::io::Error| e.kind() == std::io::ErrorKind::NotFound;
    let device = |d: &Error| match d {
        Error::Refused { .. } | Error::RegionSize { .. } | Error::Memory { .. } => true,
        Error::Io {
            op: Op::Stat | Op::Open,
            source,
            ..
        } => missing(source),
        _ => false,
    };
    let filter = |f: &FilterError| match f {
        FilterError::NotBlock { .. } | FilterError::AlreadyAttached { .. } => true,
        FilterError::Open { source, .. } => missing(source),
        _ => false,
    };
    let refused = e.chain().find_map(|c| {
        if c.is::<Refused>() {
            return Some(true);
        }
        if let Some(d) = c.downcast_ref::<Error>() {
            return Some(device(d));
        }
        if let Some(f) = c.downcast_ref::<FilterError>() {
            return Some(filter(f));
        }
        if let Some(m) = c.downcast_ref::<MigrateError>() {
            return Some(match m {
                MigrateError::Device(d) => device(d),
                MigrateError::Filter(f) => filter(f),
                MigrateError::OtherTarget { .. } | MigrateError::AlreadySwitched { .. } => true,
                _ => false,
            });
        }
        c.downcast_ref::<RecoverError>().map(|r| match r {
            RecoverError::Device(d) => device(d),
            _ => true,
        })
    });
    if refused == Some(true) {
        EXIT_REFUSED
    } else {
        1
    }
}

/// migrate.1 (with an EXIT STATUS section) and one page a subcommand
/// (migrate-start.1, ...) in `dir`.
fn write_man_pages(dir: &Path) -> std::io::Result<()> {
    let mut cmd = <Documented as clap::CommandFactory>::command().disable_help_subcommand(true);
    cmd.build();
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        clap_mangen::Man::new(sub.clone()).generate_to(dir)?;
    }
    let man = clap_mangen::Man::new(cmd);
    let mut page = Vec::new();
    man.render_title(&mut page)?;
    man.render_name_section(&mut page)?;
    man.render_synopsis_section(&mut page)?;
    man.render_description_section(&mut page)?;
    man.render_options_section(&mut page)?;
    man.render_subcommands_section(&mut page)?;
    page.extend_from_slice(b".SH \"EXIT STATUS\"\n.nf\n");
    for line in EXIT_STATUS.lines().skip(1) {
        page.extend_from_slice(line.replace('\\', "\\e").as_bytes());
        page.push(b'\n');
    }
    page.extend_from_slice(b".fi\n");
    man.render_version_section(&mut page)?;
    std::fs::write(dir.join(man.get_filename()), page)
}

/// `migrate assets OUTDIR`: the man pages (OUTDIR/man/migrate.1 and one
/// a subcommand) and the completions of bash, zsh and fish
/// (OUTDIR/completions/).
fn write_assets(outdir: &Path) -> Result<()> {
    use clap::CommandFactory;
    use clap_complete::Shell;
    let man = outdir.join("man");
    let completions = outdir.join("completions");
    for d in [&man, &completions] {
        std::fs::create_dir_all(d).with_context(|| format!("cannot create {}", d.display()))?;
    }
    write_man_pages(&man)
        .with_context(|| format!("cannot write the man pages to {}", man.display()))?;
    for (shell, file) in [
        (Shell::Bash, "migrate.bash"),
        (Shell::Zsh, "_migrate"),
        (Shell::Fish, "migrate.fish"),
    ] {
        let path = completions.join(file);
        let mut text = Vec::new();
        clap_complete::generate(shell, &mut Documented::command(), "migrate", &mut text);
        std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
    }
    say!(
        "man pages in {}, completions in {}",
        man.display(),
        completions.display()
    );
    Ok(())
}

/// `migrate: ` and the error with its causes, each once, on stderr.
fn report_error(e: &anyhow::Error) {
    say!("migrate: {}", blkmig::error::chain_text(e.as_ref()));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status() -> Status {
        Status {
            holds: 3,
            hold_longest_ns: 5_000_000_000,
            migration_id: 0x5eed_0000_0000_0001,
            regions_total: 4,
            region_shift: 20,
            ..Status::default()
        }
    }

    #[test]
    fn refused_input_exits_2_and_a_failed_operation_1() {
        use blkmig::error::{Error, Op, Refusal};
        use blkmig::filter::{FilterError, Request};
        use blkmig::migration::MigrateError;
        use blkmig::recover::RecoverError;
        let p = Path::new("/dev/sdx");
        let gone = || std::io::Error::from_raw_os_error(libc::ENOENT);
        let io = |op| Error::io(op, p, 0, std::io::Error::from_raw_os_error(libc::EIO));
        let code = |e: anyhow::Error| exit_status(&e.context("in context"));
        assert_eq!(code(Error::refused(p, Refusal::Busy).into()), 2);
        assert_eq!(code(Error::io(Op::Stat, p, 0, gone()).into()), 2);
        assert_eq!(
            code(MigrateError::Device(Error::refused(p, Refusal::NotBlock)).into()),
            2
        );
        assert_eq!(code(RecoverError::NotRetired(p.into()).into()), 2);
        assert_eq!(code(Refused("attached".into()).into()), 2);
        assert_eq!(code(FilterError::NotBlock { path: p.into() }.into()), 2);
        assert_eq!(code(io(Op::Read).into()), 1);
        assert_eq!(code(MigrateError::Device(io(Op::Write)).into()), 1);
        assert_eq!(code(RecoverError::Device(io(Op::Write)).into()), 1);
        assert_eq!(code(Error::Interrupted.into()), 1);
        let kernel = FilterError::Refused {
            path: p.into(),
            request: Request::Attach,
            errno: libc::EBUSY,
        };
        assert_eq!(code(MigrateError::Filter(kernel).into()), 1);
        assert_eq!(code(anyhow::anyhow!("cannot write to standard output")), 1);
    }

    #[test]
    fn status_shows_the_holds_and_the_migration_id() {
        let j = blkmig::output::status(&status());
        assert_eq!(j["holds"], 3);
        assert_eq!(j["hold_longest_ns"], 5_000_000_000u64);
        assert_eq!(j["migration_id"], "5eed000000000001");
        let t = status_text(Path::new("/dev/sdb"), &status());
        assert!(t.contains("holds:   3, the longest 5000.0 ms"), "{t}");
        assert!(t.contains("id:      5eed000000000001"), "{t}");
    }
}
