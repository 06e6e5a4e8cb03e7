//! Progress for operators and for automation.
//!
//! On a terminal: an indicatif bar on stderr (bytes, percent, rate, time to
//! go). Off a terminal: a plain line every interval, with newlines instead of
//! carriage returns. With `--json`: one JSON object per line on stdout, with
//! stable field names and integer bytes.

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;

use crate::units::Bytes;

/// How progress is shown.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Style {
    /// A bar if stderr is a terminal, plain lines otherwise.
    Auto,
    /// Plain lines on stderr.
    Plain,
    /// JSON lines on stdout.
    Json,
    /// Nothing.
    Quiet,
}

/// Shared progress counters of one operation.
pub struct Progress {
    what: &'static str,
    total: u64,
    /// Bytes done (copied, or in sync).
    done: AtomicU64,
    /// Bytes of copy work, for the rate (equal to `done` for a plain copy;
    /// more than it for a live migration, which copies some regions twice).
    work: AtomicU64,
    /// Live migration: regions not in sync, and copies redone.
    regions: Option<(AtomicU64, AtomicU64)>,
    /// Live migration: bytes committed without a copy (the filesystem's
    /// free space).
    skipped: AtomicU64,
    started: Instant,
}

/// One progress sample, as printed in JSON.
#[derive(Debug, Serialize, PartialEq)]
pub struct Sample {
    /// [`crate::output::SCHEMA_VERSION`].
    pub schema_version: u32,
    /// `"progress"`.
    pub event: &'static str,
    /// What is in progress: `"copy"`, `"verify"`.
    pub phase: &'static str,
    /// Bytes done.
    pub bytes_done: u64,
    /// Bytes in all.
    pub bytes_total: u64,
    /// Percent done, 0..=100.
    pub percent: f64,
    /// Average rate so far, bytes per second.
    pub rate_bytes_per_sec: u64,
    /// Estimated seconds to go, `null` when there is no estimate yet.
    pub eta_seconds: Option<u64>,
    /// Live migration only: regions not yet in sync.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unsynced_regions: Option<u64>,
    /// Live migration only: region copies thrown away because a write raced them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recopies: Option<u64>,
    /// Live migration only: bytes committed without a copy because the
    /// filesystem on the source does not use them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes_skipped_free: Option<u64>,
    /// Seconds since the start.
    pub elapsed_seconds: f64,
}

impl Progress {
    /// Counters for `total` bytes of `what`.
    pub fn new(what: &'static str, total: u64) -> Arc<Self> {
        Arc::new(Self {
            what,
            total,
            done: AtomicU64::new(0),
            work: AtomicU64::new(0),
            regions: None,
            skipped: AtomicU64::new(0),
            started: Instant::now(),
        })
    }

    /// Counters for a live migration of `total` bytes in `regions` regions.
    pub fn migration(total: u64, regions: u64) -> Arc<Self> {
        Arc::new(Self {
            what: "migrate",
            total,
            done: AtomicU64::new(0),
            work: AtomicU64::new(0),
            regions: Some((AtomicU64::new(regions), AtomicU64::new(0))),
            skipped: AtomicU64::new(0),
            started: Instant::now(),
        })
    }

    /// `n` more bytes copied and done.
    pub fn add(&self, n: u64) {
        self.done.fetch_add(n, Ordering::Relaxed);
        self.work.fetch_add(n, Ordering::Relaxed);
    }

    /// `n` more bytes copied (not necessarily done: a copy may be redone).
    pub fn add_work(&self, n: u64) {
        self.work.fetch_add(n, Ordering::Relaxed);
    }

    /// `n` more bytes done (not counted as copy work).
    pub fn add_done(&self, n: u64) {
        self.done.fetch_add(n, Ordering::Relaxed);
    }

    /// `n` bytes are done in all.
    pub fn set(&self, n: u64) {
        self.done.store(n, Ordering::Relaxed);
    }

    /// Regions not in sync now.
    pub fn set_unsynced(&self, n: u64) {
        if let Some((u, _)) = &self.regions {
            u.store(n, Ordering::Relaxed);
        }
    }

    /// One region of `n` bytes committed: done, and one fewer unsynced.
    pub fn region_committed(&self, n: u64) {
        self.add_done(n);
        if let Some((u, _)) = &self.regions {
            let _ = u.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| v.checked_sub(1));
        }
    }

    /// `n` bytes committed without a copy (free space of the filesystem).
    pub fn add_skipped(&self, n: u64) {
        self.skipped.fetch_add(n, Ordering::Relaxed);
    }

    /// One more copy redone.
    pub fn add_recopy(&self) {
        if let Some((_, r)) = &self.regions {
            r.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Bytes done so far.
    pub fn done(&self) -> u64 {
        self.done.load(Ordering::Relaxed)
    }

    /// A sample of the counters now.
    pub fn sample(&self) -> Sample {
        let done = self.done();
        let work = self.work.load(Ordering::Relaxed);
        let secs = self.started.elapsed().as_secs_f64();
        let rate = if secs > 0.0 { work as f64 / secs } else { 0.0 };
        let left = self.total.saturating_sub(done);
        let eta = (rate >= 1.0 && done > 0).then(|| (left as f64 / rate).ceil() as u64);
        Sample {
            schema_version: crate::output::SCHEMA_VERSION,
            event: "progress",
            phase: self.what,
            bytes_done: done,
            bytes_total: self.total,
            percent: if self.total == 0 {
                100.0
            } else {
                (done as f64 * 1000.0 / self.total as f64).floor() / 10.0
            },
            rate_bytes_per_sec: rate as u64,
            eta_seconds: eta,
            unsynced_regions: self
                .regions
                .as_ref()
                .map(|(u, _)| u.load(Ordering::Relaxed)),
            recopies: self
                .regions
                .as_ref()
                .map(|(_, r)| r.load(Ordering::Relaxed)),
            bytes_skipped_free: self
                .regions
                .as_ref()
                .map(|_| self.skipped.load(Ordering::Relaxed)),
            elapsed_seconds: (secs * 1000.0).round() / 1000.0,
        }
    }
}

impl Sample {
    /// The plain-text line: `copy: 512.0 MiB / 2.0 GiB (25.0%), 310.2 MiB/s, 5s to go`.
    pub fn line(&self) -> String {
        let eta = match self.eta_seconds {
            Some(s) => format!("{s}s to go"),
            None => "no estimate yet".to_owned(),
        };
        let regions = match (self.unsynced_regions, self.recopies) {
            (Some(u), Some(r)) => format!(", {u} regions unsynced, {r} re-copies"),
            _ => String::new(),
        };
        let skipped = match self.bytes_skipped_free {
            Some(b) if b > 0 => format!(", {} free space skipped", Bytes(b)),
            _ => String::new(),
        };
        format!(
            "{}: {} / {} ({:.1}%), {}/s, {}{}{}",
            self.phase,
            Bytes(self.bytes_done),
            Bytes(self.bytes_total),
            self.percent,
            Bytes(self.rate_bytes_per_sec),
            eta,
            regions,
            skipped
        )
    }
}

/// The bar on the terminal now, if any: log lines are printed above it.
static BAR: Mutex<Option<ProgressBar>> = Mutex::new(None);

fn active_bar() -> Option<ProgressBar> {
    BAR.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

fn set_active_bar(bar: Option<ProgressBar>) {
    *BAR.lock().unwrap_or_else(|e| e.into_inner()) = bar;
}

/// Where log lines go: standard error, above the progress bar while one is
/// shown (the bar is cleared, the line printed, the bar drawn again), so
/// that the two do not tear each other.
#[derive(Clone, Copy, Debug, Default)]
pub struct LogWriter;

/// One log line being written; printed when dropped.
pub struct LogLine(Vec<u8>);

impl Write for LogLine {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for LogLine {
    fn drop(&mut self) {
        // Nowhere to report a failed write of a log line.
        let print = || {
            let _ = std::io::stderr().lock().write_all(&self.0);
        };
        match active_bar() {
            Some(bar) => bar.suspend(print),
            None => print(),
        }
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogWriter {
    type Writer = LogLine;

    fn make_writer(&'a self) -> LogLine {
        LogLine(Vec::new())
    }
}

/// Shows `progress` until the returned guard is finished or dropped.
pub struct Reporter {
    stop: Option<tokio::sync::oneshot::Sender<bool>>,
    task: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

impl Reporter {
    /// Starts showing `progress` in `style`, plain and JSON lines every
    /// `interval`.
    pub fn start(progress: Arc<Progress>, style: Style, interval: Duration) -> Self {
        let style = match style {
            Style::Auto if std::io::stderr().is_terminal() => Style::Auto,
            Style::Auto => Style::Plain,
            s => s,
        };
        if style == Style::Quiet {
            return Self {
                stop: None,
                task: None,
            };
        }
        let (tx, mut rx) = tokio::sync::oneshot::channel::<bool>();
        let task = tokio::spawn(async move {
            let bar = (style == Style::Auto).then(|| {
                let bar = ProgressBar::with_draw_target(Some(progress.total), ProgressDrawTarget::stderr());
                bar.set_style(
                    ProgressStyle::with_template(
                        "{prefix} [{bar:30}] {binary_bytes}/{binary_total_bytes} {percent}% {binary_bytes_per_sec} {msg}",
                    )
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> "),
                );
                bar.set_prefix(progress.what);
                set_active_bar(Some(bar.clone()));
                bar
            });
            let tick = if bar.is_some() {
                Duration::from_millis(100)
            } else {
                interval
            };
            // The first failure to write JSON to stdout (a closed pipe, a
            // full disk): reporting stops, the caller is told at the end.
            let mut failed: Option<std::io::Error> = None;
            let mut emit = |end: Option<bool>| {
                let s = progress.sample();
                match (&bar, style) {
                    (Some(bar), _) => {
                        bar.set_position(s.bytes_done);
                        let eta = match s.eta_seconds {
                            Some(e) => format!("{e}s to go"),
                            None => "no estimate".to_owned(),
                        };
                        bar.set_message(match (s.unsynced_regions, s.recopies) {
                            (Some(u), Some(r)) => format!("{eta}, {u} unsynced, {r} re-copies"),
                            _ => eta,
                        });
                        match end {
                            Some(true) => bar.finish_with_message("done"),
                            // Failed or interrupted: left where it stopped.
                            Some(false) => bar.abandon_with_message("stopped"),
                            None => {}
                        }
                    }
                    (None, Style::Json) if failed.is_none() => {
                        if let Ok(j) = serde_json::to_string(&s) {
                            let mut out = std::io::stdout().lock();
                            if let Err(e) = writeln!(out, "{j}").and_then(|()| out.flush()) {
                                failed = Some(e);
                            }
                        }
                    }
                    (None, Style::Json) => {}
                    _ => {
                        let _ = writeln!(std::io::stderr(), "{}", s.line());
                    }
                }
            };
            let mut ticker = tokio::time::interval(tick);
            ticker.tick().await;
            loop {
                tokio::select! {
                    _ = ticker.tick() => emit(None),
                    ok = &mut rx => { emit(Some(ok.unwrap_or(false))); break; }
                }
            }
            if bar.is_some() {
                set_active_bar(None);
            }
            failed.map_or(Ok(()), Err)
        });
        Self {
            stop: Some(tx),
            task: Some(task),
        }
    }

    /// Prints the final state (`ok`: the operation completed; otherwise a
    /// bar is left where it stopped) and stops. Fails if progress could not
    /// be written to standard output.
    pub async fn finish(mut self, ok: bool) -> std::io::Result<()> {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(ok);
        }
        match self.task.take() {
            Some(t) => t.await.unwrap_or(Ok(())),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sample_reports_percent_and_no_estimate_at_start() {
        let p = Progress::new("copy", 4 << 20);
        let s = p.sample();
        assert_eq!(s.bytes_done, 0);
        assert_eq!(s.percent, 0.0);
        assert_eq!(s.eta_seconds, None);
        assert!(s.line().contains("no estimate yet"), "{}", s.line());
        p.add(1 << 20);
        let s = p.sample();
        assert_eq!(s.bytes_done, 1 << 20);
        assert_eq!(s.percent, 25.0);
        assert!(
            s.line().starts_with("copy: 1.0 MiB / 4.0 MiB (25.0%)"),
            "{}",
            s.line()
        );
    }

    #[test]
    fn committed_regions_move_done_and_unsynced_together() {
        let p = Progress::migration(8 << 20, 8);
        p.region_committed(1 << 20);
        p.region_committed(1 << 20);
        let s = p.sample();
        assert_eq!((s.bytes_done, s.unsynced_regions), (2 << 20, Some(6)));
        p.set_unsynced(0);
        p.region_committed(1 << 20);
        assert_eq!(
            p.sample().unsynced_regions,
            Some(0),
            "unsynced went below zero"
        );
    }

    #[test]
    fn json_fields_are_stable() {
        let p = Progress::new("verify", 100);
        p.add(100);
        let v: serde_json::Value = serde_json::to_value(p.sample()).unwrap_or_default();
        for k in [
            "schema_version",
            "event",
            "phase",
            "bytes_done",
            "bytes_total",
            "percent",
            "rate_bytes_per_sec",
            "eta_seconds",
            "elapsed_seconds",
        ] {
            assert!(v.get(k).is_some(), "missing {k} in {v}");
        }
        assert_eq!(v["bytes_done"], 100);
        assert_eq!(v["percent"], 100.0);
    }
}
