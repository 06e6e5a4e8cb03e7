//! `migrate`: live migration of a block device (and offline copies).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use blkmig::copy::{self, CopyOptions};
use blkmig::core::abi::{self, AttachOptions, Mode, Status};
use blkmig::device::{Access, Device, Kind, Probe};
use blkmig::error::{Error, Refusal};
use blkmig::filter::Filtered;
use blkmig::progress::{Progress, Reporter, Style};
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
    #[arg(long, default_value = "1M")]
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

fn cancel_on_ctrl_c() -> Arc<AtomicBool> {
    let cancel = Arc::new(AtomicBool::new(false));
    let c = cancel.clone();
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            c.store(true, Ordering::Relaxed);
        }
    });
    cancel
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
    let cancel = cancel_on_ctrl_c();
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

fn cmd_attach(a: AttachArgs) -> Result<()> {
    let (sp, tp) = probe_pair(&a.source, &a.target)?;
    for p in [&sp, &tp] {
        if p.kind != Kind::Block {
            return Err(Error::refused(&p.path, Refusal::NotADevice)).context(
                "live migration works on block devices; use `migrate copy` for image files",
            );
        }
    }
    // The target must be unused: blkmig will own it. The source is live.
    tp.check_unused()?;
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
    let geo = copy::geometry(&src, &tgt, a.region_size)?;
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
    Ok(())
}

fn mode_name(m: u32) -> &'static str {
    match Mode::from_raw(m) {
        Some(Mode::Clone) => "clone",
        Some(Mode::Redirect) => "redirect",
        Some(Mode::Failed) => "failed",
        None => "unknown",
    }
}

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
            println!("failure: {} (errno {})", st.failure, st.failure_errno);
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
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("migrate: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let res = rt.block_on(async {
        match cli.cmd {
            Cmd::Copy(a) => cmd_copy(a).await,
            Cmd::Attach(a) => cmd_attach(a),
            Cmd::Detach { source } => {
                Filtered::open(&source)?.detach()?;
                eprintln!("blkmig detached from {}", source.display());
                Ok(())
            }
            Cmd::Status { source, json } => cmd_status(&source, json),
        }
    });
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("migrate: {e:#}");
            ExitCode::FAILURE
        }
    }
}
