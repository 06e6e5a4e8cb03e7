//! The pipelined region copier.
//!
//! `queue_depth` workers each own one aligned buffer and take regions from a
//! shared cursor; each region is read from the source and written to the
//! target on tokio's blocking pool, so while one worker reads another
//! writes. A rate limit (bytes per second) paces region starts.

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use blkmig_core::abi;
use blkmig_core::region::Geometry;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};

use crate::buffer::AlignedBuf;
use crate::device::Device;
use crate::error::{Error, Refusal, Result};

use crate::progress::Progress;
use crate::units::Bytes;

/// How to copy.
#[derive(Clone, Debug)]
pub struct CopyOptions {
    /// Region size: the unit of copying, checksums and (later) tracking.
    pub region_size: Bytes,
    /// Regions in flight at once.
    pub queue_depth: usize,
    /// Limit in bytes per second, if any.
    pub rate_limit: Option<Bytes>,
    /// Leave all-zero source regions as holes / write-zeroes on the target.
    pub sparse: bool,
}

impl Default for CopyOptions {
    fn default() -> Self {
        Self {
            region_size: Bytes(1 << 20),
            queue_depth: 8,
            rate_limit: None,
            sparse: false,
        }
    }
}

/// What a copy did.
#[derive(Clone, Debug, serde::Serialize)]
pub struct CopyReport {
    /// Bytes of the source.
    pub bytes_total: u64,
    /// Bytes read from the source and written to the target.
    pub bytes_written: u64,
    /// Bytes of all-zero regions zeroed on the target instead of written.
    pub bytes_zeroed: u64,
    /// Number of regions.
    pub regions: u64,
    /// Seconds the copy took, including the final flush.
    pub seconds: f64,
    /// crc32 of each source region, in order.
    #[serde(skip)]
    pub checksums: Vec<u32>,
}

/// Checks the region size against both devices and builds the geometry.
pub fn geometry(src: &Device, tgt: &Device, region_size: Bytes) -> Result<Geometry> {
    let block = src.block_size().max(tgt.block_size());
    let bad = || Error::RegionSize {
        region: region_size,
        block,
    };
    if !region_size.0.is_power_of_two() || !region_size.0.is_multiple_of(u64::from(block)) {
        return Err(bad());
    }
    Geometry::new(src.size().sectors().0, region_size.0.trailing_zeros()).map_err(|_| bad())
}

/// Checks that `tgt` can receive a copy of `src`.
pub fn check_target_size(src: &Device, tgt: &Device) -> Result<()> {
    if tgt.size() < src.size() {
        return Err(Error::refused(
            tgt.path(),
            Refusal::TooSmall {
                target_size: tgt.size(),
                source_size: src.size(),
            },
        ));
    }
    Ok(())
}

/// Refuses a target whose logical blocks are larger than the source's: a
/// write the source takes could not be mirrored.
pub fn check_block_sizes(src: &Device, tgt: &Device) -> Result<()> {
    if tgt.block_size() > src.block_size() {
        return Err(Error::refused(
            tgt.path(),
            Refusal::BlockSize {
                target_block: tgt.block_size(),
                source_block: src.block_size(),
            },
        ));
    }
    Ok(())
}

/// Refuses a live migration whose region map the module would not
/// allocate (more than [`abi::REGIONS_MAX`] regions), naming the smallest
/// region size that fits.
pub fn check_region_count(src: &Device, geo: &Geometry) -> Result<()> {
    if geo.regions() <= abi::REGIONS_MAX {
        return Ok(());
    }
    let suggest = src
        .size()
        .0
        .div_ceil(abi::REGIONS_MAX)
        .next_power_of_two()
        .max(geo.region_bytes());
    Err(Error::refused(
        src.path(),
        Refusal::TooManyRegions {
            regions: geo.regions(),
            region_bytes: geo.region_bytes(),
            max: abi::REGIONS_MAX,
            suggest,
        },
    ))
}

/// A limiter of `rate` bytes per second with a burst of `burst` bytes (one
/// region: the limit holds from the first second on); `None` for no limit.
pub fn limiter(rate: Option<Bytes>, burst: u64) -> Option<Arc<DefaultDirectRateLimiter>> {
    // Cells are KiB so that rates up to 4 TiB/s fit governor's u32 counts.
    let kib = |b: u64| u32::try_from(b.div_ceil(1024).max(1)).unwrap_or(u32::MAX);
    let rate = rate?;
    let per_sec = NonZeroU32::new(kib(rate.0))?;
    let burst = NonZeroU32::new(kib(burst))?;
    Some(Arc::new(RateLimiter::direct(
        Quota::per_second(per_sec).allow_burst(burst),
    )))
}

/// Waits until the rate limit lets `len` more bytes go, or until `cancel`.
/// More than the limiter's burst is let through one burst at a time.
pub async fn pace(limit: &DefaultDirectRateLimiter, len: u64, cancel: &AtomicBool) -> Result<()> {
    let Some(mut cells) = NonZeroU32::new(u32::try_from(len.div_ceil(1024)).unwrap_or(u32::MAX))
    else {
        return Ok(());
    };
    let cancelled = async {
        while !cancel.load(Ordering::Relaxed) {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    };
    tokio::pin!(cancelled);
    loop {
        tokio::select! {
            res = limit.until_n_ready(cells) => match res {
                Ok(()) => return Ok(()),
                // More than a burst: wait for one burst, then the rest.
                Err(governor::InsufficientCapacity(burst)) => {
                    let Some(b) = NonZeroU32::new(burst) else { return Ok(()) };
                    let rest = cells.get() - burst.min(cells.get());
                    tokio::select! {
                        _ = limit.until_n_ready(b) => {}
                        () = &mut cancelled => return Err(Error::Interrupted),
                    }
                    let Some(r) = NonZeroU32::new(rest) else { return Ok(()) };
                    cells = r;
                }
            },
            () = &mut cancelled => return Err(Error::Interrupted),
        }
    }
}

/// [`pace`] under every limit of `limits` in turn (a copier's own and one
/// it shares with other copiers).
pub async fn pace_all(
    limits: &[Arc<DefaultDirectRateLimiter>],
    len: u64,
    cancel: &AtomicBool,
) -> Result<()> {
    for l in limits {
        pace(l, len, cancel).await?;
    }
    Ok(())
}

/// Work done on one region by a worker, on the blocking pool: given the
/// buffer, region index, byte offset and length, returns the region's crc32
/// and how many bytes were written (as opposed to zeroed).
pub type RegionFn = dyn Fn(&mut AlignedBuf, u64, u64, usize) -> Result<(u32, u64)> + Send + Sync;

/// Runs `f` over every region of `geo` with `depth` workers, pacing by
/// `rate`, counting bytes into `progress`. Stops at the first error or when
/// `cancel` is set. Returns the crc32 of every region and the bytes written.
pub async fn for_each_region(
    geo: Geometry,
    depth: usize,
    align: usize,
    rate: Option<Bytes>,
    progress: Arc<Progress>,
    cancel: Arc<AtomicBool>,
    f: Arc<RegionFn>,
) -> Result<(Vec<u32>, u64)> {
    let n = geo.regions();
    let next = Arc::new(AtomicU64::new(0));
    let limit = limiter(rate, geo.region_bytes());
    let plan = crate::buffer::plan(
        geo.region_bytes(),
        geo.bytes(),
        n,
        depth,
        crate::buffer::mem_available(),
    )?;
    let region_len = plan.len;
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..plan.depth {
        let (next, limit, progress, cancel, f) = (
            next.clone(),
            limit.clone(),
            progress.clone(),
            cancel.clone(),
            f.clone(),
        );
        workers.spawn(async move {
            let mut buf = Some(AlignedBuf::new(align, region_len));
            let mut out: Vec<(u64, u32)> = Vec::new();
            let mut written = 0u64;
            loop {
                if cancel.load(Ordering::Relaxed) {
                    return Err(Error::Interrupted);
                }
                let r = next.fetch_add(1, Ordering::Relaxed);
                let Some((off, len)) = geo.region_span(r) else {
                    break;
                };
                if let Some(l) = &limit {
                    pace(l, len, &cancel).await?;
                }
                let mut b = buf.take().ok_or(Error::Interrupted)?;
                let f = f.clone();
                let len_us = len as usize;
                let (b, res) = tokio::task::spawn_blocking(move || {
                    let res = f(&mut b, r, off, len_us);
                    (b, res)
                })
                .await
                .map_err(|e| {
                    // Stop the other workers too.
                    next.store(u64::MAX / 2, Ordering::Relaxed);
                    Error::joined(&e, "copy")
                })?;
                buf = Some(b);
                match res {
                    Ok((crc, w)) => {
                        out.push((r, crc));
                        written += w;
                        progress.add(len);
                    }
                    Err(e) => {
                        // Stop the other workers too.
                        next.store(u64::MAX / 2, Ordering::Relaxed);
                        return Err(e);
                    }
                }
            }
            Ok((out, written))
        });
    }
    let mut crcs = vec![0u32; usize::try_from(n).unwrap_or(0)];
    let mut written = 0;
    let mut first_err = None;
    while let Some(res) = workers.join_next().await {
        match res {
            Ok(Ok((out, w))) => {
                written += w;
                for (r, c) in out {
                    crcs[r as usize] = c;
                }
            }
            Ok(Err(e)) => {
                // Keep the most informative error: an I/O error beats the
                // Interrupted of workers that were stopped because of it.
                if first_err.is_none() || matches!(first_err, Some(Error::Interrupted)) {
                    first_err = Some(e);
                }
            }
            Err(e) => {
                if first_err.is_none() || matches!(first_err, Some(Error::Interrupted)) {
                    first_err = Some(Error::joined(&e, "copy"));
                }
            }
        }
    }
    match first_err {
        Some(e) => Err(e),
        None => Ok((crcs, written)),
    }
}

/// Copies `src` to `tgt` region by region, then flushes the target.
pub async fn copy(
    src: Arc<Device>,
    tgt: Arc<Device>,
    opts: &CopyOptions,
    progress: Arc<Progress>,
    cancel: Arc<AtomicBool>,
) -> Result<CopyReport> {
    check_target_size(&src, &tgt)?;
    let geo = geometry(&src, &tgt, opts.region_size)?;
    let started = Instant::now();
    let align = src.mem_align().max(tgt.mem_align());
    let sparse = opts.sparse;
    let (s, t) = (src.clone(), tgt.clone());
    let f: Arc<RegionFn> = Arc::new(move |buf: &mut AlignedBuf, _r, off, len| {
        let data = &mut buf[..len];
        s.read_exact_at(data, off)?;
        let crc = crc32fast::hash(data);
        if sparse && buf.is_zero(len) {
            t.zero_range(off, len as u64)?;
            Ok((crc, 0))
        } else {
            t.write_all_at(&buf[..len], off)?;
            Ok((crc, len as u64))
        }
    });
    let (checksums, written) = for_each_region(
        geo,
        opts.queue_depth,
        align,
        opts.rate_limit,
        progress,
        cancel,
        f,
    )
    .await?;
    let t = tgt.clone();
    tokio::task::spawn_blocking(move || t.flush())
        .await
        .map_err(|e| Error::joined(&e, "flush"))??;
    Ok(CopyReport {
        bytes_total: src.size().0,
        bytes_written: written,
        bytes_zeroed: src.size().0 - written,
        regions: geo.regions(),
        seconds: started.elapsed().as_secs_f64(),
        checksums,
    })
}

/// What a verification found.
#[derive(Clone, Debug, serde::Serialize)]
pub struct VerifyReport {
    /// Regions compared.
    pub regions: u64,
    /// Seconds it took.
    pub seconds: f64,
}

/// Reads the target back and compares each region's crc32 with `expected`
/// (the source's, from the copy). The first mismatch is an error.
pub async fn verify(
    src: Arc<Device>,
    tgt: Arc<Device>,
    region_size: Bytes,
    expected: Arc<Vec<u32>>,
    depth: usize,
    progress: Arc<Progress>,
    cancel: Arc<AtomicBool>,
) -> Result<VerifyReport> {
    let geo = geometry(&src, &tgt, region_size)?;
    let started = Instant::now();
    let align = src.mem_align().max(tgt.mem_align());
    let (s, t) = (src.clone(), tgt.clone());
    let f: Arc<RegionFn> = Arc::new(move |buf: &mut AlignedBuf, r, off, len| {
        let data = &mut buf[..len];
        t.read_exact_at(data, off)?;
        let crc = crc32fast::hash(data);
        if expected.get(r as usize) != Some(&crc) {
            return Err(Error::Mismatch {
                region: r,
                offset: off,
                len: len as u64,
                source_path: s.path().to_owned(),
                target_path: t.path().to_owned(),
            });
        }
        Ok((crc, 0))
    });
    for_each_region(geo, depth, align, None, progress, cancel, f).await?;
    Ok(VerifyReport {
        regions: geo.regions(),
        seconds: started.elapsed().as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A worker that panics is a bug, and is reported as one, not as an
    /// interruption.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_panicked_worker_is_reported_as_a_bug() {
        let geo = Geometry::new(64, 12).unwrap_or_else(|e| panic!("{e:?}"));
        let f: Arc<RegionFn> = Arc::new(|_: &mut AlignedBuf, r, _, _| {
            if r == 3 {
                panic!("worker bug");
            }
            Ok((0, 0))
        });
        let res = for_each_region(
            geo,
            2,
            512,
            None,
            Progress::new("copy", 64 << 9),
            Arc::new(AtomicBool::new(false)),
            f,
        )
        .await;
        let e = res.err().unwrap_or_else(|| panic!("no error"));
        assert!(matches!(e, Error::Panicked { .. }), "{e:?}");
        assert!(e.to_string().contains("bug"), "{e}");
    }

    /// More than a burst is paced too (it once went through at once: the
    /// limiter refuses a request larger than its burst).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn more_than_a_burst_waits_for_the_rate() {
        let l = limiter(Some(Bytes(1 << 20)), 64 << 10).unwrap_or_else(|| panic!("no limiter"));
        let cancel = AtomicBool::new(false);
        let t0 = Instant::now();
        // Eight bursts at 1 MiB/s: the first is free, the rest take ~440 ms.
        pace(&l, 512 << 10, &cancel)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let took = t0.elapsed();
        assert!(took >= std::time::Duration::from_millis(350), "{took:?}");
        assert!(took < std::time::Duration::from_secs(5), "{took:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn pacing_stops_when_cancelled() {
        let l = limiter(Some(Bytes(1 << 10)), 1 << 10).unwrap_or_else(|| panic!("no limiter"));
        let cancel = AtomicBool::new(true);
        let res = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            pace(&l, 64 << 10, &cancel),
        )
        .await
        .unwrap_or_else(|_| panic!("pace did not see the cancel"));
        assert!(matches!(res, Err(Error::Interrupted)), "{res:?}");
    }
}
