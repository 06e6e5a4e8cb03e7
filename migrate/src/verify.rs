//! Comparing regions on both devices under the region protocol.
//!
//! Two uses, both bound by the same rule: a comparison counts only if no
//! write was submitted to the region while it was made.
//!
//! - **Compare before copy** (resume): the copier reads the region from both
//!   devices between COPY_BEGIN and COPY_END and writes the target only if
//!   they differ. A resumed migration (the filter was attached again after
//!   a reboot, the target already holds most of the data) commits what is
//!   already there instead of rewriting it. A committed comparison is as
//!   exact as a copy: the source did not change between COPY_BEGIN and
//!   COPY_END, and the target holds the same bytes.
//! - **Verification** (`--verify`): after the copy has converged, every
//!   region whose current copy has not been compared yet is compared between
//!   VERIFY_BEGIN and VERIFY_END. A mismatch unsyncs the region so that it is
//!   copied again, and is compared again afterwards; a second mismatch of the
//!   same region fails the migration before the switch.
//!
//! The target's head (the first [`Geometry::head_bytes`] of the device,
//! which may span several regions) is never written before the switch, so
//! every comparison of a region in it starts after it.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use blkmig_core::abi::{self, RegionOp};
use blkmig_core::region::Geometry;
use governor::DefaultDirectRateLimiter;

use crate::buffer::AlignedBuf;
use crate::device::Device;
use crate::error::Error;
use crate::fsmap::FreeSpace;
use crate::migration::MigrateError;
use crate::tracker::Tracker;

/// The buffers of one region in flight: the source's bytes, and the
/// target's when the region is compared (allocated on first use).
pub(crate) struct Bufs {
    src: AlignedBuf,
    tgt: Option<AlignedBuf>,
}

impl Bufs {
    /// Buffers for regions of `len` bytes at alignment `align`.
    pub(crate) fn new(align: usize, len: usize) -> Self {
        Self {
            src: AlignedBuf::new(align, len),
            tgt: None,
        }
    }

    /// The source's buffer, and the target's.
    fn both(&mut self) -> (&AlignedBuf, &mut AlignedBuf) {
        let (align, len) = (self.src.alignment(), self.src.len());
        let tgt = self.tgt.get_or_insert_with(|| AlignedBuf::new(align, len));
        (&self.src, tgt)
    }
}

/// What [`transfer`] did to one region.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Transfer {
    /// The source's bytes were written to the target (this many).
    Written(u64),
    /// The target already held the source's bytes (this many compared):
    /// nothing was written.
    Matched(u64),
    /// The region differed (this many bytes of the target read to find
    /// it: the probe alone, or all of it), and the source's bytes were
    /// written to the target (this many).
    Rewritten(u64, u64),
    /// The source's bytes were all zero: the target's were zeroed (this
    /// many) by a write-zeroes, not written.
    Zeroed(u64),
    /// The filesystem on the source does not use the region (this many
    /// bytes): nothing was read or written.
    Free(u64),
}

/// Bytes of the target a comparison before copy reads first (rounded up to
/// the target's logical block and the buffers' alignment): a fresh target
/// differs there already, and the rest of the region is then written
/// without being read.
pub(crate) const PROBE_BYTES: u64 = 4096;

/// Blocking: moves `len` bytes at `off` (region `r`) from `src` to `tgt`,
/// leaving the head alone. With `compare`, reads the target first and
/// writes only if it differs: the first [`PROBE_BYTES`] of it, then, if
/// those match, the rest.
pub(crate) fn transfer(
    src: &Device,
    tgt: &Device,
    bufs: &mut Bufs,
    (off, len, skip): (u64, u64, u64),
    compare: bool,
) -> Result<Transfer, Error> {
    let (k, n) = (skip as usize, len as usize);
    let bytes = len.saturating_sub(skip);
    let mut compared = 0;
    if compare {
        let probe = PROBE_BYTES
            .max(u64::from(tgt.block_size()))
            .max(bufs.src.alignment() as u64);
        match probed(src, tgt, bufs, (off, len, skip), probe)? {
            Compared::Same(c) => return Ok(Transfer::Matched(c)),
            Compared::Differ(c) => compared = c,
        }
    } else if k < n {
        src.read_exact_at(&mut bufs.src[k..n], off + skip)?;
    }
    if k < n && bufs.src[k..n].iter().all(|&b| b == 0) {
        // Zeroes: the target makes them itself (BLKZEROOUT, which unmaps
        // only where the device guarantees zeroes after it).
        tgt.zero_range(off + skip, bytes)?;
        return Ok(Transfer::Zeroed(bytes));
    }
    if k < n {
        tgt.write_all_at(&bufs.src[k..n], off + skip)?;
    }
    Ok(if compare {
        Transfer::Rewritten(compared, bytes)
    } else {
        Transfer::Written(bytes)
    })
}

/// Blocking: as [`transfer`] without comparison, for a copy under the
/// module's region hold: the source is read with `RWF_NOWAIT`, as a read
/// that waits for the writeback of cached pages over the region would wait
/// for writes the hold keeps. `None`: it would have waited, nothing was
/// written.
pub(crate) fn transfer_held(
    src: &Device,
    tgt: &Device,
    bufs: &mut Bufs,
    (off, len, skip): (u64, u64, u64),
) -> Result<Option<Transfer>, Error> {
    let (k, n) = (skip as usize, len as usize);
    let bytes = len.saturating_sub(skip);
    if k >= n {
        return Ok(Some(Transfer::Written(0)));
    }
    if !src.read_exact_nowait_at(&mut bufs.src[k..n], off + skip)? {
        return Ok(None);
    }
    if bufs.src[k..n].iter().all(|&b| b == 0) {
        tgt.zero_range(off + skip, bytes)?;
        return Ok(Some(Transfer::Zeroed(bytes)));
    }
    tgt.write_all_at(&bufs.src[k..n], off + skip)?;
    Ok(Some(Transfer::Written(bytes)))
}

/// What a comparison before copy found, with the bytes of the target it
/// read.
enum Compared {
    Same(u64),
    Differ(u64),
}

/// Blocking: reads region `r` of the source (into `bufs.src`) and compares
/// the target with it, the head excepted: its first `probe` bytes, and
/// only if they are the same, the rest.
fn probed(
    src: &Device,
    tgt: &Device,
    bufs: &mut Bufs,
    (off, len, skip): (u64, u64, u64),
    probe: u64,
) -> Result<Compared, Error> {
    let (k, n) = (skip as usize, len as usize);
    if k >= n {
        return Ok(Compared::Same(0));
    }
    src.read_exact_at(&mut bufs.src[k..n], off + skip)?;
    let (s, t) = bufs.both();
    // Past `n` the rest would be empty: one read of the whole.
    let p = k.saturating_add(usize::try_from(probe).unwrap_or(usize::MAX));
    let m = if p < n { p } else { n };
    tgt.read_exact_at(&mut t[k..m], off + skip)?;
    if t[k..m] != s[k..m] {
        return Ok(Compared::Differ((m - k) as u64));
    }
    if m < n {
        tgt.read_exact_at(&mut t[m..n], off + m as u64)?;
    }
    let bytes = (n - k) as u64;
    Ok(if t[m..n] == s[m..n] {
        Compared::Same(bytes)
    } else {
        Compared::Differ(bytes)
    })
}

/// Blocking: whether the source and the target hold the same bytes in
/// region `r` (the head excepted). The source's bytes are left in
/// `bufs.src`.
fn same(
    src: &Device,
    tgt: &Device,
    bufs: &mut Bufs,
    (off, len, skip): (u64, u64, u64),
) -> Result<bool, Error> {
    let (k, n) = (skip as usize, len as usize);
    if k >= n {
        return Ok(true);
    }
    src.read_exact_at(&mut bufs.src[k..n], off + skip)?;
    let (s, t) = bufs.both();
    tgt.read_exact_at(&mut t[k..n], off + skip)?;
    Ok(t[k..n] == s[k..n])
}

/// When the copier compares before it copies.
///
/// Comparing costs a read of the target; it saves the write of every region
/// the target already holds. The copier compares every batch while
/// comparisons find matches, and only one batch in `2^k` (k growing to 5)
/// while they find none: a fresh target costs a few percent more reads, a
/// resumed one is rewritten only where it differs.
#[derive(Clone, Debug)]
pub(crate) struct ComparePolicy {
    enabled: bool,
    /// Batches still to copy without comparing.
    skip: u32,
    /// Batches to skip after the next batch that finds no match.
    backoff: u32,
}

const BACKOFF_MAX: u32 = 31;

impl ComparePolicy {
    /// A policy that compares from the start, if `enabled`.
    pub(crate) fn new(enabled: bool) -> Self {
        Self {
            enabled,
            skip: 0,
            backoff: 1,
        }
    }

    /// Whether the next batch is compared.
    pub(crate) fn next_batch(&mut self) -> bool {
        if !self.enabled {
            return false;
        }
        if self.skip > 0 {
            self.skip -= 1;
            return false;
        }
        true
    }

    /// A compared batch found `matched` regions the same and `differed` not.
    pub(crate) fn record(&mut self, matched: u64, differed: u64) {
        if matched * 4 >= differed {
            // A fifth or more already on the target: keep comparing.
            self.backoff = 1;
        } else {
            self.skip = self.backoff;
            self.backoff = (self.backoff * 2 + 1).min(BACKOFF_MAX);
        }
    }
}

/// What the verifier needs of the migration.
pub(crate) struct Ctx<'a> {
    pub(crate) tracker: &'a Arc<dyn Tracker>,
    pub(crate) src: &'a Arc<Device>,
    pub(crate) tgt: &'a Arc<Device>,
    pub(crate) geo: Geometry,
    pub(crate) align: usize,
    pub(crate) depth: usize,
    /// The copier's rate limits (none inside the switch window).
    pub(crate) limits: &'a [Arc<DefaultDirectRateLimiter>],
    pub(crate) cancel: &'a AtomicBool,
    /// The free space of the source's filesystem: only what it uses is
    /// compared.
    pub(crate) free: Option<&'a Arc<dyn FreeSpace>>,
}

/// What verification found, for the summary.
#[derive(Clone, Debug, Default)]
pub(crate) struct Counts {
    /// Bytes compared by comparisons that held and matched.
    pub(crate) bytes_verified: u64,
    /// Bytes of every region read from both devices.
    pub(crate) bytes_read: u64,
    /// Comparisons voided by a write and made again.
    pub(crate) conflicts: u64,
    /// Comparisons that held and found the target different.
    pub(crate) mismatches: u64,
    /// The regions that differed, in order, each once.
    pub(crate) mismatched: Vec<u64>,
}

/// The state of `--verify`: which regions still need a comparison.
pub(crate) struct Verifier {
    /// Regions whose current copy has not had a comparison that held.
    pending: BTreeSet<u64>,
    /// Regions that differed once (and were copied again since).
    differed: HashSet<u64>,
    /// Passes in a row that could not compare a region (a write each time).
    tries: HashMap<u64, u32>,
    /// Regions written so continuously that no comparison held in
    /// [`GIVE_UP`] passes: left uncompared so that the switch can come.
    unverified: BTreeSet<u64>,
    pub(crate) counts: Counts,
}

/// Passes after which a region that a write voided every time is left
/// unverified.
const GIVE_UP: u32 = 8;

/// Sweeps of one verification pass over the regions it could not compare
/// (a write in flight, or one during the comparison).
const SWEEPS: usize = 4;

impl Verifier {
    /// Every one of `regions` regions needs a comparison.
    pub(crate) fn new(regions: u64) -> Self {
        Self {
            pending: (0..regions).collect(),
            differed: HashSet::new(),
            tries: HashMap::new(),
            unverified: BTreeSet::new(),
            counts: Counts::default(),
        }
    }

    /// Region `r` was copied and committed: its copy needs a comparison.
    pub(crate) fn copied(&mut self, r: u64) {
        self.unverified.remove(&r);
        self.tries.remove(&r);
        self.pending.insert(r);
    }

    /// Region `r` was committed without a copy, the filesystem not using
    /// it: it needs a comparison of what the filesystem uses of it.
    pub(crate) fn skipped(&mut self, r: u64) {
        self.copied(r);
    }

    /// Region `r` was committed by a comparison that held (compare before
    /// copy): it is verified.
    pub(crate) fn matched(&mut self, r: u64, bytes: u64) {
        if self.pending.remove(&r) {
            self.counts.bytes_verified += bytes;
        }
    }

    /// Regions still to compare.
    pub(crate) fn pending(&self) -> impl Iterator<Item = u64> + '_ {
        self.pending.iter().copied()
    }

    /// Puts what verification found in the migration's summary.
    pub(crate) fn fill(&self, s: &mut crate::migration::Summary) {
        s.regions_verified = s
            .regions
            .saturating_sub((self.pending.len() + self.unverified.len()) as u64);
        s.regions_unverified = self.unverified.len() as u64;
        s.bytes_verified = self.counts.bytes_verified;
        s.verify_conflicts = self.counts.conflicts;
        s.verify_mismatches = self.counts.mismatches;
        s.mismatched_regions = self.counts.mismatched.clone();
    }

    /// Whether every region has been compared since its last copy.
    pub(crate) fn done(&self) -> bool {
        self.pending.is_empty()
    }

    /// Compares every pending SYNCED region, a few sweeps over those a write
    /// got in the way of. A region that differs is unsynced (the copier
    /// copies it again) and stays pending; one that differs a second time
    /// fails the migration. Returns how many regions differed.
    pub(crate) async fn pass(&mut self, cx: &Ctx<'_>) -> Result<u64, MigrateError> {
        let mut differed = 0;
        let mut todo: Vec<u64> = self.pending.iter().copied().collect();
        for sweep in 0..SWEEPS {
            if todo.is_empty() {
                break;
            }
            if sweep > 0 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            let mut again = Vec::new();
            let mut set = tokio::task::JoinSet::new();
            let mut pool: Vec<Bufs> = Vec::new();
            for &r in &todo {
                if cx.cancel.load(Ordering::Relaxed) {
                    return Err(MigrateError::from(Error::Interrupted));
                }
                if set.len() >= cx.depth.max(1) {
                    if let Some(res) = set.join_next().await {
                        differed += self.found(cx, res, &mut pool, &mut again)?;
                    }
                }
                // Both devices are read: twice the bytes of a region.
                crate::copy::pace_all(cx.limits, 2 * cx.geo.region_bytes(), cx.cancel).await?;
                let mut bufs = pool
                    .pop()
                    .unwrap_or_else(|| Bufs::new(cx.align, cx.geo.region_bytes() as usize));
                let (tracker, src, tgt, geo) =
                    (cx.tracker.clone(), cx.src.clone(), cx.tgt.clone(), cx.geo);
                let free = cx.free.cloned();
                set.spawn_blocking(move || {
                    let res = compare(&*tracker, &src, &tgt, &mut bufs, &geo, r, free.as_deref());
                    (r, bufs, res)
                });
            }
            while let Some(res) = set.join_next().await {
                differed += self.found(cx, res, &mut pool, &mut again)?;
            }
            todo = again;
        }
        // A write voided every comparison of these: after GIVE_UP passes,
        // leave them (mirroring keeps them in step; see docs/design.md).
        for r in todo {
            let n = self.tries.entry(r).or_insert(0);
            *n += 1;
            // One that differed once must be compared after its re-copy
            // (in the switch window at the latest).
            if *n >= GIVE_UP && !self.differed.contains(&r) && self.pending.remove(&r) {
                tracing::warn!(
                    region = r,
                    "verification: the region is written too continuously to compare; left unverified"
                );
                self.unverified.insert(r);
            }
        }
        Ok(differed)
    }

    /// Takes in what one comparison found; returns 1 if the region differed.
    fn found(
        &mut self,
        cx: &Ctx<'_>,
        res: Result<(u64, Bufs, Result<Found, MigrateError>), tokio::task::JoinError>,
        pool: &mut Vec<Bufs>,
        again: &mut Vec<u64>,
    ) -> Result<u64, MigrateError> {
        let (r, bufs, found) = res.map_err(|_| MigrateError::from(Error::Interrupted))?;
        pool.push(bufs);
        let found = found?;
        if matches!(found, Found::Same(_) | Found::Differ | Found::Void) {
            self.counts.bytes_read += cx.geo.region_span(r).map_or(0, |(_, n)| n);
        }
        match found {
            Found::Busy => again.push(r),
            Found::Void => {
                // A write was submitted during the comparison: it says
                // nothing either way. Compare again.
                self.counts.conflicts += 1;
                again.push(r);
            }
            // Not in sync: the copier copies it (in the switch window at the
            // latest), and it is compared after that copy.
            Found::NotSynced => {}
            Found::NotCloning => return Err(MigrateError::WrongMode("not clone")),
            Found::Range => {
                self.pending.remove(&r);
            }
            Found::Same(bytes) => {
                self.pending.remove(&r);
                self.tries.remove(&r);
                self.counts.bytes_verified += bytes;
            }
            Found::Differ => {
                self.counts.mismatches += 1;
                if !self.counts.mismatched.contains(&r) {
                    self.counts.mismatched.push(r);
                }
                let (from, to) = cx.geo.copy_range(r).unwrap_or((0, 0));
                // Copied again by the rounds; never in sync again in this
                // attachment if it differs a second time, so that no switch
                // can take it for a copy.
                cx.tracker.unsync(&mut [RegionOp {
                    region: r,
                    ..RegionOp::default()
                }])?;
                if !self.differed.insert(r) {
                    tracing::error!(
                        region = r,
                        bytes = %format_args!("{from}..{to}"),
                        "verification: the target differs from the source again after a re-copy: \
                         it does not keep what is written to it; not switching"
                    );
                    return Err(MigrateError::Device(Error::Mismatch {
                        region: r,
                        offset: from,
                        len: to - from,
                        source_path: cx.src.path().to_owned(),
                        target_path: cx.tgt.path().to_owned(),
                    }));
                }
                tracing::warn!(
                    region = r,
                    bytes = %format_args!("{from}..{to}"),
                    "verification: the target differs from the source; copying the region again"
                );
                return Ok(1);
            }
        }
        Ok(0)
    }
}

/// What one comparison found.
enum Found {
    /// A write is in flight: compare later.
    Busy,
    /// Not in sync: copy it first.
    NotSynced,
    /// A write was submitted during the comparison: compare again.
    Void,
    /// The same bytes on both devices (this many compared).
    Same(u64),
    /// Different bytes, and no write came in between.
    Differ,
    /// The filter is not cloning.
    NotCloning,
    /// Not a region of the device.
    Range,
}

/// Blocking: one comparison of region `r` between VERIFY_BEGIN and
/// VERIFY_END, so that it holds only if no write was submitted to the
/// region while both devices were read. With `free` (the free space of the
/// source's filesystem, which the copier skips), only the parts the
/// filesystem uses, per a query made after VERIFY_BEGIN, are compared:
/// the rest may never have been copied, and the filesystem never reads it.
fn compare(
    tracker: &dyn Tracker,
    src: &Device,
    tgt: &Device,
    bufs: &mut Bufs,
    geo: &Geometry,
    r: u64,
    free: Option<&dyn FreeSpace>,
) -> Result<Found, MigrateError> {
    let mut op = [RegionOp {
        region: r,
        ..RegionOp::default()
    }];
    tracker.verify_begin(&mut op)?;
    match op[0].result {
        abi::REGION_OK => {}
        abi::REGION_BUSY => return Ok(Found::Busy),
        abi::REGION_NOT_SYNCED => return Ok(Found::NotSynced),
        abi::REGION_NOT_CLONING => return Ok(Found::NotCloning),
        _ => return Ok(Found::Range),
    }
    let Some((off, len)) = geo.region_span(r) else {
        return Ok(Found::Range);
    };
    let skip = geo.head_len(r).min(len);
    let (equal, compared) = match free.map(|f| f.free((off + skip, off + len))) {
        Some(Ok(free)) => {
            let mut equal = true;
            let mut compared = 0;
            for (s, e) in crate::fsmap::used(&free, (off + skip, off + len)) {
                compared += e - s;
                equal &= same(src, tgt, bufs, (off, e - off, s - off))?;
                if !equal {
                    break;
                }
            }
            (equal, compared)
        }
        // No answer: compare it all (a difference is copied again).
        Some(Err(e)) => {
            tracing::warn!(region = r, error = %e, "verification: cannot read the filesystem's free space; comparing the whole region");
            (same(src, tgt, bufs, (off, len, skip))?, len - skip)
        }
        None => (same(src, tgt, bufs, (off, len, skip))?, len - skip),
    };
    tracker.verify_end(&mut op)?;
    Ok(if op[0].result != abi::REGION_OK {
        Found::Void
    } else if equal {
        Found::Same(compared)
    } else {
        Found::Differ
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compare_policy_backs_off_on_a_fresh_target_and_comes_back() {
        let mut p = ComparePolicy::new(true);
        assert!(p.next_batch());
        p.record(0, 16);
        assert!(!p.next_batch(), "one batch skipped after a miss");
        assert!(p.next_batch());
        p.record(0, 16);
        let skipped = (0..3).filter(|_| !p.next_batch()).count();
        assert_eq!(skipped, 3, "three batches skipped after a second miss");
        // Many misses: at most one batch in BACKOFF_MAX + 1 is compared.
        for _ in 0..10 {
            while !p.next_batch() {}
            p.record(1, 15);
        }
        let skipped = (0..100).take_while(|_| !p.next_batch()).count();
        assert_eq!(skipped as u32, BACKOFF_MAX);
        // A batch that finds the target mostly there: compare every batch.
        p.record(12, 4);
        assert!(p.next_batch() && p.next_batch());
        assert!(!ComparePolicy::new(false).next_batch());
    }
}
