//! `stampwriter`: the live writer of the VM scenarios, and its checker.
//!
//! `write` rewrites 4 KiB blocks of a file (on the filesystem being
//! migrated) with O_DIRECT, each stamped with its block number, a sequence
//! number and a crc32 of the block, until a stop file appears. It keeps the
//! last sequence written to each block and saves that log when it stops,
//! with the longest write latency and every write slower than a threshold
//! (the switch pause, seen from the writer's side), and a summary of the
//! writes' latencies (median, 99th percentile, longest) for the benchmarks.
//!
//! `verify` checks, after the migration, that every block of the file holds
//! exactly its last stamp from the log.
//!
//! `jsondoc` checks `migrate`'s JSON output against `docs/json.md`.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use blkmig::buffer::AlignedBuf;
use blkmig::core::abi;
use clap::{Parser, Subcommand};

const BLOCK: usize = 4096;
const MAGIC: u32 = 0x424c_4b53; // "BLKS"

#[derive(Parser)]
#[command(name = "stampwriter")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Write stamped blocks until STOP exists.
    Write {
        /// The data file (created, BLOCKS * 4 KiB).
        file: PathBuf,
        /// Where to save the log of last sequences.
        log: PathBuf,
        /// Number of 4 KiB blocks in the file.
        #[arg(long, default_value_t = 4096)]
        blocks: u64,
        /// Stop when this file exists.
        #[arg(long)]
        stop: PathBuf,
        /// Write only this block (a hot region), every other write.
        #[arg(long)]
        hot: Option<u64>,
        /// Pause between writes, microseconds.
        #[arg(long, default_value_t = 0)]
        gap_us: u64,
        /// Write at this many writes per second, on a fixed schedule (a
        /// write that falls behind is followed by the next at once, until
        /// the schedule is caught up), instead of --gap-us.
        #[arg(long, conflicts_with = "gap_us")]
        rate: Option<u64>,
        /// Report writes slower than this many milliseconds.
        #[arg(long, default_value_t = 20)]
        slow_ms: u64,
        /// Seed of the block choice.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// How the rewrites are issued.
        #[arg(long, value_enum, default_value_t = Io::Sync)]
        io: Io,
        /// Crash tests: every write is durable when it completes (O_DSYNC),
        /// and is then acknowledged in this file ("BLOCK SEQ" lines,
        /// fdatasync'ed), which `verify-acked` checks after a reset.
        #[arg(long)]
        ack: Option<PathBuf>,
    },
    /// Rebuilds on OUT (a device that starts zeroed, as large as the
    /// logged one) what a dm-log-writes LOG says was durable: every logged
    /// write up to the last flush, and every FUA write after it.
    ReplayLog {
        /// The log device of dm-log-writes.
        log: PathBuf,
        /// Where to replay (written at the logged sectors).
        out: PathBuf,
    },
    /// After a crash: every block of FILE holds an intact stamp of its own
    /// block, at least as new as the last one ACK acknowledges.
    VerifyAcked {
        /// The data file.
        file: PathBuf,
        /// The acknowledgements `write --ack` kept.
        ack: PathBuf,
    },
    /// Read LEN bytes at OFFSET of DEV again and again with O_DIRECT
    /// through a polled io_uring (IORING_SETUP_IOPOLL, so the bios carry
    /// REQ_POLLED) until STOP exists. Fails at the first error.
    PollRead {
        /// The device.
        dev: PathBuf,
        /// Byte offset.
        #[arg(long, default_value_t = 0)]
        offset: u64,
        /// Bytes per read.
        #[arg(long, default_value_t = 4096)]
        len: usize,
        /// Stop when this file exists.
        #[arg(long)]
        stop: PathBuf,
    },
    /// Write the VM scenarios' sector pattern (`lib.sh` `pattern`) with
    /// O_DIRECT in I/Os of BS bytes. Unlike busybox dd, which quietly
    /// falls back to buffered I/O when O_DIRECT is refused, this fails.
    DioWrite {
        /// The device.
        dev: PathBuf,
        /// First 512-byte sector.
        sector: u64,
        /// The pattern's tag.
        tag: String,
        /// Number of 512-byte sectors.
        nsect: u64,
        /// Bytes per write (a multiple of 512).
        #[arg(long, default_value_t = 512)]
        bs: usize,
    },
    /// Raw requests to the blkmig filter of DEV, for the VM scenarios that
    /// check the ABI's refusals: prints what the kernel answered.
    Abi {
        #[command(subcommand)]
        req: AbiReq,
    },
    /// Check JSON lines on standard input (the output of `migrate ...
    /// --json`) against the tables of docs/json.md: each line must match one
    /// of KINDS. Fails (exit status 1), naming each field, when a line has a
    /// field the document does not name, lacks a required one, or has a
    /// value of another type; also when no line was read.
    ///
    /// Example: `migrate status /dev/vdb --json | stampwriter jsondoc
    /// docs/json.md status status-offline`. The kinds: progress, copy-done,
    /// start-done, status, status-offline, list, rebalance (and those they
    /// include).
    #[command(verbatim_doc_comment)]
    Jsondoc {
        /// The document (docs/json.md).
        doc: PathBuf,
        /// The kinds a line may be.
        #[arg(required = true)]
        kinds: Vec<String>,
    },
    /// Check that every block holds its last stamp.
    Verify {
        /// The data file.
        file: PathBuf,
        /// The log `write` saved.
        log: PathBuf,
    },
}

fn fill(buf: &mut [u8], block: u64, seq: u64) {
    let mut x =
        block.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ seq.wrapping_mul(0xbf58_476d_1ce4_e5b9) | 1;
    for c in buf[24..].chunks_exact_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        c.copy_from_slice(&x.to_le_bytes());
    }
    buf[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    buf[8..16].copy_from_slice(&block.to_le_bytes());
    buf[16..24].copy_from_slice(&seq.to_le_bytes());
    let crc = crc32fast::hash(&buf[8..]);
    buf[4..8].copy_from_slice(&crc.to_le_bytes());
}

/// (block, seq) of a stamped block, or why it is not one.
fn stamp(buf: &[u8]) -> Result<(u64, u64), String> {
    let word = |a: usize| u64::from_le_bytes(buf[a..a + 8].try_into().unwrap_or([0; 8]));
    let magic = u32::from_le_bytes(buf[0..4].try_into().unwrap_or([0; 4]));
    if magic != MAGIC {
        return Err(format!("no stamp (magic {magic:#x})"));
    }
    let crc = u32::from_le_bytes(buf[4..8].try_into().unwrap_or([0; 4]));
    if crc != crc32fast::hash(&buf[8..]) {
        return Err("crc mismatch (torn or corrupt block)".into());
    }
    Ok((word(8), word(16)))
}

#[derive(Subcommand)]
enum AbiReq {
    /// STATUS on a file opened read-only: prints the errno (EBADF expected).
    StatusReadOnly { dev: PathBuf },
    /// HOLD_WRITES with a nonzero reserved field: prints the errno.
    HoldReserved { dev: PathBuf },
    /// COPY_BEGIN with a flag bit no version defines: prints the errno.
    CopyReserved { dev: PathBuf },
    /// COPY_BEGIN of REGION: prints the result and the word.
    CopyBegin { dev: PathBuf, region: u64 },
    /// COPY_BEGIN of REGION with REGION_OP_HOLD, and no COPY_END (a copier
    /// that dies in a held copy): prints the result and the word, or the
    /// errno.
    CopyBeginHeld { dev: PathBuf, region: u64 },
    /// One COPY_BEGIN of REGION with REGION_OP_HOLD and of REGION + 1 with
    /// a flag bit no version defines: prints the errno.
    CopyBeginHeldBad { dev: PathBuf, region: u64 },
    /// One COPY_BEGIN of REGION and of REGION + 1, both with
    /// REGION_OP_HOLD: prints the errno.
    CopyBeginHeldTwo { dev: PathBuf, region: u64 },
    /// COPY_END of REGION with WORD: prints the result.
    CopyEnd {
        dev: PathBuf,
        region: u64,
        word: u64,
    },
}

fn errno_of(e: &blkmig::filter::FilterError) -> String {
    blkmig::filter::errno_name(&e.errno()).to_owned()
}

fn region_op(dev: &Path, cmd: abi::CtlCmd, op: abi::RegionOp) -> Result<abi::RegionOp> {
    let ops = region_ops(dev, cmd, &[op])?;
    Ok(ops[0])
}

/// One CTL call of `cmd` with `ops`: the ops as the module returned them.
fn region_ops(dev: &Path, cmd: abi::CtlCmd, ops: &[abi::RegionOp]) -> Result<Vec<abi::RegionOp>> {
    const SIZE: usize = std::mem::size_of::<abi::RegionOp>();
    let f = blkmig::filter::Filtered::open(dev)?;
    let mut buf = vec![0u8; SIZE * ops.len()];
    for (op, out) in ops.iter().zip(buf.chunks_mut(SIZE)) {
        let fields: [&[u8]; 4] = [
            &op.region.to_ne_bytes(),
            &op.word.to_ne_bytes(),
            &op.result.to_ne_bytes(),
            &op.flags.to_ne_bytes(),
        ];
        let mut at = 0;
        for b in fields {
            out[at..at + b.len()].copy_from_slice(b);
            at += b.len();
        }
    }
    f.ctl(cmd, &mut buf)?;
    Ok(buf
        .chunks(SIZE)
        .map(|b| {
            let u64_at = |o: usize| u64::from_ne_bytes(b[o..o + 8].try_into().unwrap_or([0; 8]));
            let u32_at = |o: usize| u32::from_ne_bytes(b[o..o + 4].try_into().unwrap_or([0; 4]));
            abi::RegionOp {
                region: u64_at(0),
                word: u64_at(8),
                result: u32_at(16),
                flags: u32_at(20),
            }
        })
        .collect())
}

/// Prints `ok` and what `show` makes of the value, or the errno of a
/// filter error.
fn print_or_errno<T>(r: Result<T>, show: impl Fn(T) -> String) -> Result<()> {
    match r {
        Ok(v) => println!("{}", show(v)),
        Err(e) => match e.downcast_ref::<blkmig::filter::FilterError>() {
            Some(fe) => println!("{}", errno_of(fe)),
            None => return Err(e),
        },
    }
    Ok(())
}

fn abi_probe(req: AbiReq) -> Result<()> {
    match req {
        AbiReq::StatusReadOnly { dev } => {
            use std::os::fd::AsRawFd;
            let f = File::open(&dev).with_context(|| format!("open {}", dev.display()))?;
            let mut st = [0u8; std::mem::size_of::<abi::Status>()];
            let mut name = [0u8; abi::BLKFILTER_NAME_LENGTH];
            name[..abi::FILTER_NAME.len()].copy_from_slice(abi::FILTER_NAME);
            let mut arg = abi::BlkfilterCtl {
                name,
                cmd: abi::CtlCmd::Status as u32,
                optlen: st.len() as u32,
                opt: st.as_mut_ptr() as u64,
            };
            // SAFETY: BLKFILTER_CTL reads and writes one `BlkfilterCtl`
            // (`arg`) and at most `optlen` bytes at `opt` (`st`), both alive
            // for the call.
            let r = unsafe {
                libc::ioctl(
                    f.as_raw_fd(),
                    abi::BLKFILTER_CTL as _,
                    std::ptr::from_mut(&mut arg),
                )
            };
            if r == 0 {
                println!("ok");
            } else {
                let e = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
                println!("{}", blkmig::filter::errno_name(&e));
            }
        }
        AbiReq::HoldReserved { dev } => {
            let f = blkmig::filter::Filtered::open(&dev)?;
            let mut buf = [0u8; 8];
            buf[0..4].copy_from_slice(&1000u32.to_ne_bytes());
            buf[4..8].copy_from_slice(&1u32.to_ne_bytes());
            match f.ctl(abi::CtlCmd::HoldWrites, &mut buf) {
                Ok(_) => {
                    let _ = f.ctl(abi::CtlCmd::Release, &mut []);
                    println!("ok");
                }
                Err(e) => println!("{}", errno_of(&e)),
            }
        }
        AbiReq::CopyReserved { dev } => {
            let op = abi::RegionOp {
                region: 1,
                // A flag bit no version defines.
                flags: 1 << 31,
                ..Default::default()
            };
            match region_op(&dev, abi::CtlCmd::CopyBegin, op) {
                Ok(op) => println!("ok {}", op.result),
                Err(e) => match e.downcast_ref::<blkmig::filter::FilterError>() {
                    Some(fe) => println!("{}", errno_of(fe)),
                    None => return Err(e),
                },
            }
        }
        AbiReq::CopyBeginHeld { dev, region } => {
            let op = abi::RegionOp {
                region,
                flags: abi::REGION_OP_HOLD,
                ..Default::default()
            };
            print_or_errno(region_op(&dev, abi::CtlCmd::CopyBegin, op), |op| {
                format!("{} {}", op.result, op.word)
            })?;
        }
        AbiReq::CopyBeginHeldBad { dev, region } => {
            let ops = [
                abi::RegionOp {
                    region,
                    flags: abi::REGION_OP_HOLD,
                    ..Default::default()
                },
                abi::RegionOp {
                    region: region + 1,
                    flags: 1 << 31,
                    ..Default::default()
                },
            ];
            print_or_errno(region_ops(&dev, abi::CtlCmd::CopyBegin, &ops), |ops| {
                format!("ok {}", ops[0].result)
            })?;
        }
        AbiReq::CopyBeginHeldTwo { dev, region } => {
            let ops = [region, region + 1].map(|region| abi::RegionOp {
                region,
                flags: abi::REGION_OP_HOLD,
                ..Default::default()
            });
            print_or_errno(region_ops(&dev, abi::CtlCmd::CopyBegin, &ops), |ops| {
                format!("ok {} {}", ops[0].result, ops[1].result)
            })?;
        }
        AbiReq::CopyBegin { dev, region } => {
            let op = abi::RegionOp {
                region,
                ..Default::default()
            };
            let op = region_op(&dev, abi::CtlCmd::CopyBegin, op)?;
            println!("{} {}", op.result, op.word);
        }
        AbiReq::CopyEnd { dev, region, word } => {
            let op = abi::RegionOp {
                region,
                word,
                ..Default::default()
            };
            let op = region_op(&dev, abi::CtlCmd::CopyEnd, op)?;
            println!("{}", op.result);
        }
    }
    Ok(())
}

/// How `write` issues its rewrites.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Io {
    /// pwrite(2).
    Sync,
    /// io_uring: the kernel tries each write with IOCB_NOWAIT (REQ_NOWAIT
    /// bios) before it falls back to a worker.
    Uring,
    /// io_uring with IORING_SETUP_IOPOLL: polled bios (REQ_POLLED).
    UringPoll,
}

/// How long one io_uring operation may take before it counts as hung.
const RING_WAIT: Duration = Duration::from_secs(30);

/// One io_uring, one operation at a time.
struct Ring {
    ring: io_uring::IoUring,
}

impl Ring {
    fn new(poll: bool) -> Result<Self> {
        let mut b = io_uring::IoUring::builder();
        if poll {
            b.setup_iopoll();
        }
        Ok(Self {
            ring: b.build(4).context("io_uring_setup")?,
        })
    }

    /// Runs `entry` and returns its result (bytes, or the error).
    fn run(&mut self, entry: &io_uring::squeue::Entry) -> std::io::Result<usize> {
        // SAFETY: The buffer `entry` names is alive until its completion,
        // which `submit_and_wait(1)` waits for before returning.
        unsafe { self.ring.submission().push(entry) }
            .map_err(|_| std::io::Error::other("submission queue full"))?;
        // A polled ring's wait may return before the completion is in: go
        // on reaping (polling), for at most RING_WAIT.
        let t0 = Instant::now();
        self.ring.submit_and_wait(1)?;
        let cqe = loop {
            if let Some(cqe) = self.ring.completion().next() {
                break cqe;
            }
            if t0.elapsed() > RING_WAIT {
                return Err(std::io::Error::other(format!(
                    "no completion within {} s",
                    RING_WAIT.as_secs()
                )));
            }
            self.ring.submit_and_wait(1)?;
        };
        usize::try_from(cqe.result()).map_err(|_| std::io::Error::from_raw_os_error(-cqe.result()))
    }

    fn write_at(&mut self, f: &File, buf: &[u8], off: u64) -> std::io::Result<()> {
        use std::os::fd::AsRawFd;
        let e = io_uring::opcode::Write::new(
            io_uring::types::Fd(f.as_raw_fd()),
            buf.as_ptr(),
            buf.len() as u32,
        )
        .offset(off)
        .build();
        match self.run(&e)? {
            n if n == buf.len() => Ok(()),
            n => Err(std::io::Error::other(format!("short write: {n} bytes"))),
        }
    }

    fn read_at(&mut self, f: &File, buf: &mut [u8], off: u64) -> std::io::Result<()> {
        use std::os::fd::AsRawFd;
        let e = io_uring::opcode::Read::new(
            io_uring::types::Fd(f.as_raw_fd()),
            buf.as_mut_ptr(),
            buf.len() as u32,
        )
        .offset(off)
        .build();
        match self.run(&e)? {
            n if n == buf.len() => Ok(()),
            n => Err(std::io::Error::other(format!("short read: {n} bytes"))),
        }
    }
}

fn poll_read(dev: &Path, offset: u64, len: usize, stop: &Path) -> Result<()> {
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(dev)
        .with_context(|| format!("open {} with O_DIRECT", dev.display()))?;
    let mut ring = Ring::new(true)?;
    let mut buf = AlignedBuf::new(BLOCK, len);
    let mut n = 0u64;
    let mut worst = Duration::ZERO;
    println!(
        "poll-read: reading {len} bytes at {offset} of {} (polled)",
        dev.display()
    );
    while !stop.exists() {
        let t0 = Instant::now();
        ring.read_at(&f, &mut buf, offset)
            .with_context(|| format!("polled read {n} of {}", dev.display()))?;
        worst = worst.max(t0.elapsed());
        n += 1;
    }
    println!(
        "poll-read: {n} polled reads, longest {:.1} ms",
        worst.as_secs_f64() * 1e3
    );
    Ok(())
}

fn open_direct(path: &Path, create: bool) -> Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(create)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .with_context(|| format!("open {}", path.display()))
}

#[allow(clippy::too_many_arguments)]
fn write(
    file: &Path,
    log: &Path,
    blocks: u64,
    stop: &Path,
    hot: Option<u64>,
    pace: Pace,
    slow: Duration,
    seed: u64,
    io: Io,
    ack: Option<&Path>,
) -> Result<()> {
    let f = match ack {
        None => open_direct(file, true)?,
        Some(_) => OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .custom_flags(libc::O_DIRECT | libc::O_DSYNC)
            .open(file)
            .with_context(|| format!("open {}", file.display()))?,
    };
    let mut acks = match ack {
        Some(p) => Some(File::create(p).with_context(|| format!("create {}", p.display()))?),
        None => None,
    };
    let mut ring = match io {
        Io::Sync => None,
        Io::Uring => Some(Ring::new(false)?),
        Io::UringPoll => Some(Ring::new(true)?),
    };
    let mut buf = AlignedBuf::new(BLOCK, BLOCK);
    let mut last = vec![0u64; blocks as usize];
    // Stamp every block once, so that every block has a known last stamp.
    let mut seq = 0u64;
    for b in 0..blocks {
        seq += 1;
        fill(&mut buf, b, seq);
        f.write_all_at(&buf, b * BLOCK as u64)
            .context("initial write")?;
        last[b as usize] = seq;
    }
    f.sync_all().context("fsync")?;
    if let Some(a) = acks.as_mut() {
        let mut text = String::new();
        for (b, s) in last.iter().enumerate() {
            text.push_str(&format!("{b} {s}\n"));
        }
        a.write_all(text.as_bytes())
            .context("write the acknowledgements")?;
        a.sync_data().context("fdatasync the acknowledgements")?;
    }
    println!(
        "stampwriter: {blocks} blocks stamped, writing until {} exists",
        stop.display()
    );
    let started = Instant::now();
    let mut x = seed | 1;
    let mut worst = Duration::ZERO;
    let mut worst_at = 0.0;
    let mut slow_log = Vec::new();
    let mut writes = 0u64;
    let mut lat = Latencies::default();
    let mut n = 0u64;
    while !stop.exists() {
        for _ in 0..64 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            n += 1;
            let b = match hot {
                Some(h) if n.is_multiple_of(2) => h,
                _ => x % blocks,
            };
            seq += 1;
            fill(&mut buf, b, seq);
            if let Pace::Rate(per_sec) = pace {
                let due = started + Duration::from_secs_f64(writes as f64 / per_sec as f64);
                let now = Instant::now();
                if due > now {
                    std::thread::sleep(due - now);
                }
            }
            let t0 = Instant::now();
            match ring.as_mut() {
                None => f.write_all_at(&buf, b * BLOCK as u64),
                Some(r) => r.write_at(&f, &buf, b * BLOCK as u64),
            }
            .with_context(|| format!("write block {b} ({io:?})"))?;
            let dt = t0.elapsed();
            last[b as usize] = seq;
            if let Some(a) = acks.as_mut() {
                writeln!(a, "{b} {seq}").context("write an acknowledgement")?;
                a.sync_data().context("fdatasync the acknowledgements")?;
            }
            writes += 1;
            lat.record(dt);
            if dt > worst {
                worst = dt;
                worst_at = started.elapsed().as_secs_f64();
            }
            if dt >= slow {
                slow_log.push((started.elapsed().as_secs_f64(), dt));
            }
            if let Pace::Gap(gap) = pace {
                std::thread::sleep(gap);
            }
        }
    }
    f.sync_all().context("fsync")?;
    let mut out = File::create(log).with_context(|| format!("create {}", log.display()))?;
    for (b, s) in last.iter().enumerate() {
        writeln!(out, "{b} {s}")?;
    }
    out.sync_all()?;
    let secs = started.elapsed().as_secs_f64();
    println!(
        "stampwriter: {writes} writes in {secs:.1}s ({:.0}/s), longest write {:.1} ms at {worst_at:.2}s, {} writes >= {} ms",
        writes as f64 / secs,
        worst.as_secs_f64() * 1e3,
        slow_log.len(),
        slow.as_millis()
    );
    for (at, dt) in slow_log.iter().take(20) {
        println!(
            "stampwriter: slow write at {at:.2}s: {:.1} ms",
            dt.as_secs_f64() * 1e3
        );
    }
    println!(
        "STAMPWRITER-MAX-LATENCY-MS {:.1}",
        worst.as_secs_f64() * 1e3
    );
    println!(
        "STAMPWRITER-SUMMARY writes={writes} secs={secs:.2} p50_us={} p99_us={} max_us={}",
        lat.percentile(50).as_micros(),
        lat.percentile(99).as_micros(),
        worst.as_micros()
    );
    Ok(())
}

/// How `write` spaces its writes.
#[derive(Clone, Copy, Debug)]
enum Pace {
    /// A fixed pause after every write (none when zero).
    Gap(Duration),
    /// Writes per second, on a fixed schedule from the start.
    Rate(u64),
}

/// Every write's latency, for percentiles at the end.
#[derive(Default)]
struct Latencies {
    all: Vec<Duration>,
}

impl Latencies {
    fn record(&mut self, d: Duration) {
        self.all.push(d);
    }

    /// The smallest latency that at least `p` percent of the writes did not
    /// exceed (nearest rank); zero when nothing was recorded.
    fn percentile(&mut self, p: u32) -> Duration {
        if self.all.is_empty() {
            return Duration::ZERO;
        }
        self.all.sort_unstable();
        let n = self.all.len();
        let rank = (n * p as usize).div_ceil(100).clamp(1, n);
        self.all[rank - 1]
    }
}

fn verify(file: &Path, log: &Path) -> Result<()> {
    let f = open_direct(file, false)?;
    let text = std::fs::read_to_string(log).with_context(|| format!("read {}", log.display()))?;
    let mut buf = AlignedBuf::new(BLOCK, BLOCK);
    let mut bad = 0;
    let mut n = 0;
    for line in text.lines() {
        let mut it = line.split_whitespace().map(str::parse::<u64>);
        let (Some(Ok(b)), Some(Ok(want))) = (it.next(), it.next()) else {
            bail!("bad log line {line:?}");
        };
        f.read_exact_at(&mut buf, b * BLOCK as u64)
            .with_context(|| format!("read block {b}"))?;
        n += 1;
        match stamp(&buf) {
            Ok((blk, seq)) if blk == b && seq == want => {}
            Ok((blk, seq)) => {
                bad += 1;
                if bad <= 10 {
                    eprintln!(
                        "block {b}: holds stamp (block {blk}, seq {seq}), expected seq {want}"
                    );
                }
            }
            Err(why) => {
                bad += 1;
                if bad <= 10 {
                    eprintln!("block {b}: {why}");
                }
            }
        }
    }
    if bad > 0 {
        bail!("{bad} of {n} blocks do not hold their last stamp");
    }
    println!("stampwriter: all {n} blocks hold their last stamp");
    Ok(())
}

const LOG_MAGIC: u64 = 0x006a_7366_7773_6872;
const LOG_FLUSH: u64 = 1 << 0;
const LOG_FUA: u64 = 1 << 1;
const LOG_DISCARD: u64 = 1 << 2;
const LOG_MARK: u64 = 1 << 3;

/// One entry of a dm-log-writes log: where its data lies in the log.
struct LogEntry {
    sector: u64,
    nr_sectors: u64,
    flags: u64,
    data_at: u64,
}

fn replay_log(log: &Path, out: &Path) -> Result<()> {
    let l = File::open(log).with_context(|| format!("open {}", log.display()))?;
    let le = |b: &[u8], at: usize| u64::from_le_bytes(b[at..at + 8].try_into().unwrap_or([0; 8]));
    let mut sup = [0u8; 32];
    l.read_exact_at(&mut sup, 0)
        .context("read the log's super block")?;
    if le(&sup, 0) != LOG_MAGIC {
        bail!(
            "{} is not a dm-log-writes log (magic {:#x})",
            log.display(),
            le(&sup, 0)
        );
    }
    let bs = u64::from(u32::from_le_bytes(sup[24..28].try_into().unwrap_or([0; 4])));
    if !(512..=65536).contains(&bs) || !bs.is_power_of_two() {
        bail!("bad sector size {bs} in the log");
    }
    // A block device's metadata says 0 bytes: its end does not.
    let len = {
        use std::io::Seek;
        (&l).seek(std::io::SeekFrom::End(0))
            .context("size of the log")?
    };
    // Walk the entries until a blank one (the log device started zeroed;
    // the super block's count may lag the last entries written).
    let mut entries = Vec::new();
    let mut pos = bs;
    let mut meta = vec![0u8; bs as usize];
    while pos + bs <= len {
        l.read_exact_at(&mut meta, pos)
            .context("read a log entry")?;
        let (sector, nr_sectors, flags) = (le(&meta, 0), le(&meta, 8), le(&meta, 16));
        if sector == 0 && nr_sectors == 0 && flags == 0 {
            break;
        }
        if flags & !(LOG_FLUSH | LOG_FUA | LOG_DISCARD | LOG_MARK | (1 << 4)) != 0 {
            bail!(
                "entry {} at byte {pos}: unknown flags {flags:#x}",
                entries.len()
            );
        }
        let data = if flags & (LOG_DISCARD | LOG_MARK) != 0 {
            0
        } else {
            nr_sectors
        };
        entries.push(LogEntry {
            sector,
            nr_sectors,
            flags,
            data_at: pos + bs,
        });
        pos += bs * (1 + data);
    }
    let last_flush = entries.iter().rposition(|e| e.flags & LOG_FLUSH != 0);
    let o = OpenOptions::new()
        .write(true)
        .open(out)
        .with_context(|| format!("open {}", out.display()))?;
    let (mut applied, mut fua_after) = (0u64, 0u64);
    for (i, e) in entries.iter().enumerate() {
        let durable = last_flush.is_some_and(|f| i <= f) || e.flags & LOG_FUA != 0;
        if !durable || e.flags & LOG_MARK != 0 || e.nr_sectors == 0 {
            continue;
        }
        let n = (e.nr_sectors * bs) as usize;
        let buf = if e.flags & LOG_DISCARD != 0 {
            vec![0u8; n]
        } else {
            let mut b = vec![0u8; n];
            l.read_exact_at(&mut b, e.data_at)
                .context("read logged data")?;
            b
        };
        o.write_all_at(&buf, e.sector * bs)
            .context("replay a write")?;
        applied += 1;
        fua_after += u64::from(last_flush.is_none_or(|f| i > f));
    }
    o.sync_all().context("fsync the replay")?;
    println!(
        "replay-log: {} entries, the last flush is entry {}; {applied} writes replayed ({fua_after} FUA writes after it)",
        entries.len(),
        last_flush.map_or("none".to_owned(), |f| f.to_string())
    );
    Ok(())
}

fn verify_acked(file: &Path, ack: &Path) -> Result<()> {
    let f = open_direct(file, false)?;
    let text = std::fs::read_to_string(ack).with_context(|| format!("read {}", ack.display()))?;
    let mut want: Vec<u64> = Vec::new();
    let mut lines = 0;
    for line in text.lines() {
        let mut it = line.split_whitespace().map(str::parse::<u64>);
        // The last line may be torn by the crash: it was never acknowledged.
        let (Some(Ok(b)), Some(Ok(seq)), None) = (it.next(), it.next(), it.next()) else {
            continue;
        };
        if want.len() <= b as usize {
            want.resize(b as usize + 1, 0);
        }
        want[b as usize] = want[b as usize].max(seq);
        lines += 1;
    }
    if want.is_empty() {
        bail!("{} holds no acknowledgement", ack.display());
    }
    let mut buf = AlignedBuf::new(BLOCK, BLOCK);
    let (mut bad, mut newer) = (0, 0);
    for (b, &w) in want.iter().enumerate() {
        f.read_exact_at(&mut buf, b as u64 * BLOCK as u64)
            .with_context(|| format!("read block {b}"))?;
        match stamp(&buf) {
            Ok((blk, seq)) if blk == b as u64 && seq >= w => newer += u64::from(seq > w),
            Ok((blk, seq)) => {
                bad += 1;
                if bad <= 10 {
                    eprintln!("block {b}: holds stamp (block {blk}, seq {seq}), but seq {w} was acknowledged");
                }
            }
            Err(why) => {
                bad += 1;
                if bad <= 10 {
                    eprintln!("block {b}: {why}");
                }
            }
        }
    }
    if bad > 0 {
        bail!("{bad} of {} blocks lost an acknowledged write", want.len());
    }
    println!(
        "stampwriter: all {} blocks hold their acknowledged stamps ({lines} acknowledgements; {newer} blocks newer, written but not yet acknowledged)",
        want.len()
    );
    Ok(())
}

fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::Write {
            file,
            log,
            blocks,
            stop,
            hot,
            gap_us,
            rate,
            slow_ms,
            seed,
            io,
            ack,
        } => write(
            &file,
            &log,
            blocks,
            &stop,
            hot,
            match rate {
                Some(r) => Pace::Rate(r.max(1)),
                None => Pace::Gap(Duration::from_micros(gap_us)),
            },
            Duration::from_millis(slow_ms),
            seed,
            io,
            ack.as_deref(),
        ),
        Cmd::VerifyAcked { file, ack } => verify_acked(&file, &ack),
        Cmd::ReplayLog { log, out } => replay_log(&log, &out),
        Cmd::PollRead {
            dev,
            offset,
            len,
            stop,
        } => poll_read(&dev, offset, len, &stop),
        Cmd::Verify { file, log } => verify(&file, &log),
        Cmd::Jsondoc { doc, kinds } => jsondoc(&doc, &kinds),
        Cmd::Abi { req } => abi_probe(req),
        Cmd::DioWrite {
            dev,
            sector,
            tag,
            nsect,
            bs,
        } => dio_write(&dev, sector, &tag, nsect, bs),
    }
}

/// Sector `i` of pattern `tag`: "TAG <i, 10 digits>", padded with spaces
/// to 511 bytes, then a newline.
fn pattern_sector(tag: &str, i: u64, out: &mut [u8]) {
    let text = format!("{tag} {i:010}");
    out.fill(b' ');
    out[..text.len()].copy_from_slice(text.as_bytes());
    out[511] = b'\n';
}

fn dio_write(dev: &Path, sector: u64, tag: &str, nsect: u64, bs: usize) -> Result<()> {
    if bs == 0 || !bs.is_multiple_of(512) {
        bail!("--bs {bs} is not a positive multiple of 512");
    }
    let f = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(dev)
        .with_context(|| format!("open {} with O_DIRECT", dev.display()))?;
    let mut buf = AlignedBuf::new(4096, bs);
    let per = (bs / 512) as u64;
    let mut i = 0;
    while i < nsect {
        let n = per.min(nsect - i);
        for k in 0..n {
            let at = (k * 512) as usize;
            pattern_sector(tag, i + k, &mut buf[at..at + 512]);
        }
        let len = (n * 512) as usize;
        f.write_all_at(&buf[..len], (sector + i) * 512)
            .with_context(|| {
                format!(
                    "O_DIRECT write of {len} bytes at sector {} of {}",
                    sector + i,
                    dev.display()
                )
            })?;
        i += n;
    }
    println!(
        "dio-write: {nsect} sectors of pattern {tag} at sector {sector}, {bs}-byte O_DIRECT writes"
    );
    Ok(())
}

/// `jsondoc`: every line of standard input against the kinds of `doc`.
fn jsondoc(doc: &Path, kinds: &[String]) -> Result<()> {
    use std::io::BufRead;
    let text =
        std::fs::read_to_string(doc).with_context(|| format!("cannot read {}", doc.display()))?;
    let doc = blkmig::jsondoc::Doc::parse(&text).with_context(|| format!("{}", doc.display()))?;
    let kinds: Vec<&str> = kinds.iter().map(String::as_str).collect();
    let (mut lines, mut bad) = (0, 0);
    for (i, line) in std::io::stdin().lock().lines().enumerate() {
        let line = line.context("cannot read standard input")?;
        if line.trim().is_empty() {
            continue;
        }
        lines += 1;
        let v: serde_json::Value = serde_json::from_str(&line)
            .with_context(|| format!("line {}: not JSON: {line}", i + 1))?;
        if let Err(problems) = doc.check(&kinds, &v) {
            bad += 1;
            for p in problems {
                eprintln!("line {}: {p}", i + 1);
            }
        }
    }
    if lines == 0 {
        bail!("no JSON line on standard input");
    }
    if bad > 0 {
        bail!(
            "{bad} of {lines} lines do not match docs: {}",
            kinds.join(", ")
        );
    }
    println!("{lines} lines match {}", kinds.join(" or "));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_round_trip_and_detect_damage() {
        let mut b = vec![0u8; BLOCK];
        fill(&mut b, 7, 42);
        assert_eq!(stamp(&b), Ok((7, 42)));
        b[100] ^= 1;
        assert!(stamp(&b).is_err());
        assert!(stamp(&[0u8; BLOCK]).is_err());
    }

    #[test]
    fn percentiles_by_nearest_rank() {
        let mut lat = Latencies::default();
        assert_eq!(lat.percentile(99), Duration::ZERO);
        for ms in (1..=100).rev() {
            lat.record(Duration::from_millis(ms));
        }
        assert_eq!(lat.percentile(50), Duration::from_millis(50));
        assert_eq!(lat.percentile(99), Duration::from_millis(99));
        assert_eq!(lat.percentile(100), Duration::from_millis(100));
        lat.record(Duration::from_secs(2));
        // 101 writes: the 99th percentile is rank 100, the slowest is alone above it.
        assert_eq!(lat.percentile(99), Duration::from_millis(100));
    }

    #[test]
    fn verify_finds_a_stale_block() {
        let dir = std::env::temp_dir().join(format!("stampwriter-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap_or_default();
        let (file, log) = (dir.join("data"), dir.join("log"));
        let mut data = vec![0u8; 3 * BLOCK];
        for (b, s) in [(0u64, 5u64), (1, 6), (2, 7)] {
            fill(
                &mut data[b as usize * BLOCK..(b as usize + 1) * BLOCK],
                b,
                s,
            );
        }
        std::fs::write(&file, &data).unwrap_or_default();
        std::fs::write(&log, "0 5\n1 6\n2 7\n").unwrap_or_default();
        let ok = verify(&file, &log);
        std::fs::write(&log, "0 5\n1 9\n2 7\n").unwrap_or_default();
        let stale = verify(&file, &log);
        let _ = std::fs::remove_dir_all(&dir);
        assert!(ok.is_ok(), "a correct file was reported bad: {ok:?}");
        assert!(stale.is_err(), "a stale block was not reported");
    }
}
