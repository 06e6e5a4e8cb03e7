//! `migrate`: live migration of a block device (and offline copies).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use blkmig::copy::{self, CopyOptions};
use blkmig::core::abi::{self, AttachOptions, Mode, Status};
use blkmig::device::{Access, Device, Kind, Probe};
use blkmig::error::{Error, Refusal};
use blkmig::filter::Filtered;
use blkmig::migration::{self, MigrateError, MigrateOptions, Migration};
use blkmig::progress::{Progress, Reporter, Style};
use blkmig::tracker::Tracker;
use blkmig::units::Bytes;
use clap::{Args, Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "migrate",
    version,
    about = "Move a live block device to another one, with no downtime"
)]
struct Cli {
    /// Log more (repeat for more detail); RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    #[command(subcommand)]
    cmd: Cmd,
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
    /// Attach the blkmig filter to a live source, with TARGET as its target.
    Attach(AttachArgs),
    /// Detach the blkmig filter (in CLONE mode: abandons the migration).
    Detach {
        /// The filtered source device.
        source: PathBuf,
    },
    /// Show the state of the migration of SOURCE.
    Status {
        /// The filtered source device.
        source: PathBuf,
        /// One JSON object on stdout, for automation.
        #[arg(long)]
        json: bool,
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
    #[arg(short = 'i', long, default_value_t = 1.0)]
    interval: f64,
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
    /// Limit the copy to this many bytes per second (e.g. 200M).
    #[arg(long)]
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
    /// Regions copied at once.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..=256))]
    queue_depth: u16,
    /// Limit the background copy to this many bytes per second (e.g. 200M).
    #[arg(long)]
    rate_limit: Option<Bytes>,
    /// Switch only when the estimated pause of writes fits this budget.
    #[arg(long, default_value = "100ms", value_parser = blkmig::units::parse_duration)]
    max_pause: Duration,
    /// Copy and keep mirroring, but do not switch (rerun without it to switch).
    #[arg(long)]
    no_switch: bool,
    /// Before the switch, compare every region on both devices; copy again
    /// what differs, and do not switch over a region that differs twice.
    #[arg(long, conflicts_with = "no_switch")]
    verify: bool,
    /// Where the source's first region is saved before it is retired.
    #[arg(long, default_value = "/var/lib/blkmig")]
    state_dir: PathBuf,
    #[command(flatten)]
    progress: ProgressArgs,
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
    /// How long writes may be held for the switch, in milliseconds.
    #[arg(long, default_value_t = abi::HOLD_TIMEOUT_MS_DEFAULT,
        value_parser = clap::value_parser!(u32).range(1..=abi::HOLD_TIMEOUT_MS_MAX as i64))]
    hold_timeout_ms: u32,
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

fn interval(p: &ProgressArgs) -> Result<Duration> {
    Duration::try_from_secs_f64(p.interval)
        .ok()
        .filter(|d| !d.is_zero())
        .with_context(|| {
            format!(
                "invalid --interval {}: must be a positive number of seconds",
                p.interval
            )
        })
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

/// Probes both paths and refuses, before anything is opened for writing,
/// the same device twice, overlapping partitions, and mounted devices.
fn probe_pair(source: &Path, target: &Path) -> Result<(Probe, Probe), Error> {
    let s = Probe::new(source)?;
    let t = Probe::new(target)?;
    s.check_distinct(&t)?;
    Ok((s, t))
}

async fn cmd_copy(a: CopyArgs) -> Result<()> {
    let (sp, tp) = probe_pair(&a.source, &a.target)?;
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
    let (style, every) = (style(&a.progress), interval(&a.progress)?);
    tracing::info!(source = %a.source.display(), target = %a.target.display(),
        size = src.size().0, region = opts.region_size.0, depth = opts.queue_depth, "copy starts");
    let cancel = cancel_on_ctrl_c()?;
    let progress = Progress::new("copy", src.size().0);
    let rep = Reporter::start(progress.clone(), style, every);
    let res = copy::copy(src.clone(), tgt.clone(), &opts, progress, cancel.clone()).await;
    rep.finish().await;
    let report = res?;
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
        rep.finish().await;
        verified = Some(res?);
    }
    let rate = report.bytes_total as f64 / report.seconds.max(1e-9);
    if style == Style::Json {
        let j = serde_json::json!({
            "event": "done",
            "bytes_total": report.bytes_total,
            "bytes_written": report.bytes_written,
            "bytes_zeroed": report.bytes_zeroed,
            "regions": report.regions,
            "seconds": report.seconds,
            "rate_bytes_per_sec": rate as u64,
            "verified": verified.is_some(),
            "verify_seconds": verified.as_ref().map(|v| v.seconds),
        });
        println!("{j}");
    } else if style != Style::Quiet {
        eprintln!(
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

/// Checks SOURCE and TARGET for a live migration and attaches blkmig.
fn attach(a: &AttachArgs) -> Result<Probe> {
    let (sp, tp) = probe_pair(&a.source, &a.target)?;
    for p in [&sp, &tp] {
        if p.kind != Kind::Block {
            return Err(Error::refused(&p.path, Refusal::NotBlock).into());
        }
    }
    // A source that is already being migrated: say so before anything else
    // (its target is, rightly, busy).
    if let Ok(st) = Filtered::open(&a.source)?.status() {
        return Err(blkmig::filter::FilterError {
            path: a.source.clone(),
            what: "cannot attach blkmig",
            meaning: format!(
                "blkmig is already attached to this device, in {} mode, migrating to device {}:{}",
                migration::mode_name(st.mode),
                st.target_major,
                st.target_minor
            ),
            errno: libc::EALREADY,
        }
        .into());
    }
    // Neither may be zoned; the source must be request-based; the target
    // must be unused: blkmig will own it. The source is live.
    sp.check_not_zoned()?;
    tp.check_not_zoned()?;
    tp.check_unused()?;
    sp.check_request_based()?;
    let shared = Access {
        write: false,
        direct: false,
        exclusive: false,
    };
    let src = Device::open(&sp, shared)?;
    let tgt = Device::open(
        &tp,
        Access {
            exclusive: true,
            ..shared
        },
    )?;
    copy::check_target_size(&src, &tgt)?;
    copy::check_block_sizes(&src, &tgt)?;
    let geo = copy::geometry(&src, &tgt, a.region_size)?;
    copy::check_region_count(&src, &geo)?;
    drop(tgt);
    let f = Filtered::open(&a.source)?;
    f.attach(
        &tp,
        AttachOptions {
            version: abi::ABI_VERSION,
            region_shift: geo.shift(),
            hold_timeout_ms: a.hold_timeout_ms,
            ..Default::default()
        },
    )?;
    eprintln!(
        "blkmig attached to {} (target {}, {} regions of {})",
        a.source.display(),
        a.target.display(),
        geo.regions(),
        Bytes(geo.region_bytes())
    );
    Ok(tp)
}

fn cmd_attach(a: AttachArgs) -> Result<()> {
    attach(&a).map(|_| ())
}

async fn cmd_start(a: StartArgs) -> Result<()> {
    let f = Filtered::open(&a.attach.source)?;
    let tp = match f.status() {
        Ok(st) => {
            // Already attached: resume, if it is ours and still cloning.
            let tp = Probe::new(&a.attach.target)?;
            let ours = matches!(tp.id, blkmig::device::DevId::Block { major, minor }
                if (major, minor) == (st.target_major, st.target_minor));
            if !ours {
                anyhow::bail!(
                    "{} is already being migrated to device {}:{}, not to {}",
                    a.attach.source.display(),
                    st.target_major,
                    st.target_minor,
                    a.attach.target.display()
                );
            }
            match Mode::from_raw(st.mode) {
                Some(Mode::Redirect) => {
                    eprintln!(
                        "{} has already switched to {}: nothing to do",
                        a.attach.source.display(),
                        a.attach.target.display()
                    );
                    return Ok(());
                }
                Some(Mode::Failed) => anyhow::bail!(
                    "the migration of {} failed: {}; run `migrate abort {}`",
                    a.attach.source.display(),
                    migration::failure_text(&st),
                    a.attach.source.display()
                ),
                _ => eprintln!(
                    "resuming the migration of {}: {} of {} regions in sync",
                    a.attach.source.display(),
                    st.regions_synced,
                    st.regions_total
                ),
            }
            tp
        }
        Err(e) if e.errno == libc::ENOENT => attach(&a.attach)?,
        Err(e) => return Err(e.into()),
    };
    let direct = |write| Access {
        write,
        direct: true,
        exclusive: false,
    };
    let sp = Probe::new(&a.attach.source)?;
    let src = Arc::new(Device::open(&sp, direct(false))?);
    let tgt = Arc::new(Device::open(&tp, direct(true))?);
    let st = f.status()?;
    let tracker: Arc<dyn Tracker> = Arc::new(f);
    let cancel = cancel_on_ctrl_c()?;
    let progress = Progress::migration(st.source_sectors << 9, st.regions_total);
    let style = style(&a.progress);
    let rep = Reporter::start(progress.clone(), style, interval(&a.progress)?);
    let opts = MigrateOptions {
        queue_depth: a.queue_depth.into(),
        rate_limit: a.rate_limit,
        max_pause: a.max_pause,
        no_switch: a.no_switch,
        hold_timeout_ms: a.attach.hold_timeout_ms,
        state_dir: a.state_dir.clone(),
        compare: true,
        verify: a.verify,
    };
    let res = match Migration::new(tracker.clone(), src, tgt, &st, opts, progress, cancel) {
        Ok(m) => m.run().await,
        Err(e) => Err(e),
    };
    rep.finish().await;
    let summary = match res {
        Ok(s) => s,
        Err(MigrateError::Interrupted) => {
            Filtered::open(&a.attach.source)?.detach()?;
            anyhow::bail!(
                "interrupted: the migration was abandoned, blkmig detached; {} is untouched and in use as before",
                a.attach.source.display()
            );
        }
        Err(e) => return Err(e.into()),
    };
    if style == Style::Json {
        let mut j = serde_json::to_value(&summary)?;
        j["event"] = "done".into();
        println!("{j}");
    }
    if style != Style::Quiet {
        let pause = summary
            .pause_ms
            .map(|p| format!("{p:.1} ms"))
            .unwrap_or_else(|| "no switch".into());
        eprintln!(
            "copied {} in {:.1}s ({} already on the target, {} re-copies, {} busy, {} rounds); writes paused {}{}",
            Bytes(summary.bytes_copied),
            summary.seconds,
            Bytes(summary.bytes_matched),
            summary.recopies,
            summary.busy,
            summary.rounds,
            pause,
            if summary.failed_switches > 0 {
                format!(" after {} failed switch attempts", summary.failed_switches)
            } else {
                String::new()
            }
        );
        if a.verify {
            eprintln!(
                "verified {} regions ({}); {} differed on the target and were copied again{}",
                summary.regions_verified,
                Bytes(summary.bytes_verified),
                summary.verify_mismatches,
                if summary.mismatched_regions.is_empty() {
                    String::new()
                } else {
                    format!(" (regions {:?})", summary.mismatched_regions)
                }
            );
        }
        if summary.switched {
            eprintln!(
                "switched: all I/O to {src} now goes to {tgt}; {src} is retired (its first region is saved in {saved}).\n\
                 Remount from {tgt} when convenient, then run `migrate detach {src}`.",
                src = a.attach.source.display(),
                tgt = a.attach.target.display(),
                saved = summary.saved_head.as_deref().unwrap_or(Path::new("?")).display(),
            );
        } else {
            eprintln!(
                "in sync and mirroring; run `migrate start {} {}` again to switch",
                a.attach.source.display(),
                a.attach.target.display()
            );
        }
    }
    Ok(())
}

fn cmd_detach(source: &Path) -> Result<()> {
    Filtered::open(source)?.detach()?;
    eprintln!("blkmig detached from {}", source.display());
    Ok(())
}

fn cmd_abort(source: &Path) -> Result<()> {
    let f = Filtered::open(source)?;
    let st = f.status()?;
    if Mode::from_raw(st.mode) == Some(Mode::Redirect) {
        anyhow::bail!(
            "{} has already switched to its target: there is nothing to abort (unmount it, then `migrate detach`)",
            source.display()
        );
    }
    f.detach()?;
    eprintln!(
        "migration of {} abandoned; blkmig detached, the source is untouched",
        source.display()
    );
    Ok(())
}

use migration::mode_name;

fn status_json(st: &Status) -> serde_json::Value {
    serde_json::json!({
        "mode": mode_name(st.mode),
        "holding": st.flags & abi::STATUS_HOLDING != 0,
        "region_bytes": 1u64 << st.region_shift,
        "source_bytes": st.source_sectors << 9,
        "target_bytes": st.target_sectors << 9,
        "regions_total": st.regions_total,
        "regions_synced": st.regions_synced,
        "copy_conflicts": st.copy_conflicts,
        "copy_busy": st.copy_busy,
        "writes_seen": st.writes_seen,
        "writes_mirrored": st.writes_mirrored,
        "writes_held": st.writes_held,
        "bios_redirected": st.bios_redirected,
        "failure": st.failure,
        "failure_text": migration::failure_text(st),
        "failure_errno": st.failure_errno,
        "target_dev": format!("{}:{}", st.target_major, st.target_minor),
    })
}

fn cmd_status(source: &Path, json: bool) -> Result<()> {
    let st = Filtered::open(source)?.status()?;
    if json {
        println!("{}", status_json(&st));
    } else {
        let pct = if st.regions_total == 0 {
            100.0
        } else {
            st.regions_synced as f64 * 100.0 / st.regions_total as f64
        };
        println!(
            "source:  {} ({})",
            source.display(),
            Bytes(st.source_sectors << 9)
        );
        println!(
            "target:  {}:{} ({})",
            st.target_major,
            st.target_minor,
            Bytes(st.target_sectors << 9)
        );
        println!(
            "mode:    {}{}",
            mode_name(st.mode),
            if st.flags & abi::STATUS_HOLDING != 0 {
                " (writes held)"
            } else {
                ""
            }
        );
        println!(
            "synced:  {} of {} regions of {} ({pct:.1}%)",
            st.regions_synced,
            st.regions_total,
            Bytes(1 << st.region_shift)
        );
        println!(
            "writes:  {} seen, {} mirrored, {} held",
            st.writes_seen, st.writes_mirrored, st.writes_held
        );
        println!(
            "copies:  {} conflicts, {} busy",
            st.copy_conflicts, st.copy_busy
        );
        if st.failure != 0 {
            println!("failure: {}", migration::failure_text(&st));
        }
    }
    Ok(())
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
        .with_writer(std::io::stderr)
        .init();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(cli.verbose);
    // Only the commands that copy need the async runtime.
    let runtime = || {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .context("cannot start the async runtime")
    };
    let res = match cli.cmd {
        Cmd::Copy(a) => runtime().and_then(|rt| rt.block_on(cmd_copy(a))),
        Cmd::Start(a) => runtime().and_then(|rt| rt.block_on(cmd_start(a))),
        Cmd::Abort { source } => cmd_abort(&source),
        Cmd::Attach(a) => cmd_attach(a),
        Cmd::Detach { source } => cmd_detach(&source),
        Cmd::Status { source, json } => cmd_status(&source, json),
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("migrate: {e:#}");
            ExitCode::FAILURE
        }
    }
}
