// SPDX-License-Identifier: GPL-2.0-only
//! The region map and the copy protocol.
//!
//! The device is cut into regions of `1 << shift` bytes (the last one may be
//! short). Each region has one 64-bit word:
//!
//! ```text
//!  63                         21 20                 1   0
//! +-----------------------------+--------------------+---+
//! |            epoch            | writes in flight   | S |
//! +-----------------------------+--------------------+---+
//! ```
//!
//! `S` (SYNCED) means the target holds the region's data and every write to
//! it is mirrored. Every write submission adds one to the epoch and one to the
//! in-flight count of each region it touches; its completion takes one off
//! the in-flight count. The copier commits a region only if its word is
//! exactly what it was when the copy began: no write was in flight then, and
//! none was submitted since, so the bytes it read from the source are the
//! bytes the source still holds.

use crate::sync::{AtomicU64, Ordering};

/// SYNCED bit.
pub const SYNCED: u64 = 1;
/// One write in flight.
pub const INFLIGHT_ONE: u64 = 1 << 1;
/// Mask of the in-flight count (bits 1..=20).
pub const INFLIGHT_MASK: u64 = ((1 << 20) - 1) << 1;
/// One epoch step.
pub const EPOCH_ONE: u64 = 1 << 21;
/// Added to a word by every write submission.
pub const WRITE_SUBMIT: u64 = EPOCH_ONE + INFLIGHT_ONE;

/// Number of writes in flight encoded in `word`.
pub const fn inflight(word: u64) -> u64 {
    (word & INFLIGHT_MASK) >> 1
}

/// Whether `word` has SYNCED set.
pub const fn is_synced(word: u64) -> bool {
    word & SYNCED != 0
}

/// Epoch encoded in `word`.
pub const fn epoch(word: u64) -> u64 {
    word >> 21
}

/// Bytes in a 512-byte sector, the unit of bio addresses.
pub const SECTOR_SHIFT: u32 = 9;

/// A half-open range of region indices, `start..end`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Regions {
    /// First region.
    pub start: u64,
    /// One past the last region.
    pub end: u64,
}

impl Regions {
    /// Number of regions in the range.
    pub const fn len(&self) -> u64 {
        self.end - self.start
    }

    /// Whether the range is empty.
    pub const fn is_empty(&self) -> bool {
        self.end <= self.start
    }
}

/// Geometry of a region map: how a device of `sectors` is cut into regions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    sectors: u64,
    shift: u32,
}

/// Why a [`Geometry`] cannot be built.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GeometryError {
    /// The region size is not within 4 KiB..=1 GiB.
    RegionSize,
    /// The device has no sectors.
    Empty,
}

impl Geometry {
    /// Geometry for a device of `sectors` 512-byte sectors and regions of
    /// `1 << shift` bytes.
    pub const fn new(sectors: u64, shift: u32) -> Result<Self, GeometryError> {
        if shift < crate::abi::REGION_SHIFT_MIN || shift > crate::abi::REGION_SHIFT_MAX {
            return Err(GeometryError::RegionSize);
        }
        if sectors == 0 {
            return Err(GeometryError::Empty);
        }
        Ok(Self { sectors, shift })
    }

    /// log2 of the region size in bytes.
    pub const fn shift(&self) -> u32 {
        self.shift
    }

    /// Device size in sectors.
    pub const fn sectors(&self) -> u64 {
        self.sectors
    }

    /// Device size in bytes.
    pub const fn bytes(&self) -> u64 {
        self.sectors << SECTOR_SHIFT
    }

    /// Region size in bytes (the last region may be shorter).
    pub const fn region_bytes(&self) -> u64 {
        1 << self.shift
    }

    const fn sector_shift(&self) -> u32 {
        self.shift - SECTOR_SHIFT
    }

    /// Number of regions, counting a short last one.
    pub const fn regions(&self) -> u64 {
        let per = 1u64 << self.sector_shift();
        self.sectors.div_ceil(per)
    }

    /// Byte range `(offset, len)` of region `r` on the device, or `None`
    /// past the end. The last region is cut at the device end.
    pub const fn region_span(&self, r: u64) -> Option<(u64, u64)> {
        if r >= self.regions() {
            return None;
        }
        let start = r << self.shift;
        let end = start + self.region_bytes();
        let dev = self.bytes();
        let end = if end > dev { dev } else { end };
        Some((start, end - start))
    }

    /// Bytes of the device's head (see [`crate::abi::RETIRE_BYTES`]): the
    /// retire marker's span on the source, and the bytes of the target
    /// only the switch writes. It may span several regions.
    pub const fn head_bytes(&self) -> u64 {
        if self.bytes() < crate::abi::RETIRE_BYTES {
            self.bytes()
        } else {
            crate::abi::RETIRE_BYTES
        }
    }

    /// Bytes of region `r` that lie in the head, from its start: what a
    /// copy of the region leaves out (0 past the head).
    pub const fn head_len(&self, r: u64) -> u64 {
        let head = self.head_bytes();
        let start = r << self.shift;
        if start >= head {
            return 0;
        }
        let end = start + self.region_bytes();
        let end = if end > head { head } else { end };
        end - start
    }

    /// The bytes of region `r` that a copy writes, as `(start, end)`: from
    /// past the head to the region's end. `None` if the head covers the
    /// whole region, or `r` is past the last region.
    pub const fn copy_range(&self, r: u64) -> Option<(u64, u64)> {
        let (off, len) = match self.region_span(r) {
            Some(span) => span,
            None => return None,
        };
        let skip = self.head_len(r);
        if skip >= len {
            return None;
        }
        Some((off + skip, off + len))
    }

    /// Whether `nr_sectors` sectors at `sector` touch the head.
    pub const fn touches_head(&self, sector: u64, nr_sectors: u64) -> bool {
        nr_sectors != 0 && sector < (self.head_bytes() >> SECTOR_SHIFT)
    }

    /// Whether `nr_sectors` sectors at `sector` lie wholly within the head.
    pub const fn within_head(&self, sector: u64, nr_sectors: u64) -> bool {
        match sector.checked_add(nr_sectors) {
            Some(end) => nr_sectors != 0 && end <= (self.head_bytes() >> SECTOR_SHIFT),
            None => false,
        }
    }

    /// Regions touched by `nr_sectors` sectors starting at `sector`, clamped
    /// to the device. An empty or out-of-device range touches no region.
    pub const fn regions_of(&self, sector: u64, nr_sectors: u64) -> Regions {
        if nr_sectors == 0 || sector >= self.sectors {
            return Regions { start: 0, end: 0 };
        }
        let last = match sector.checked_add(nr_sectors) {
            Some(end) if end <= self.sectors => end - 1,
            _ => self.sectors - 1,
        };
        Regions {
            start: sector >> self.sector_shift(),
            end: (last >> self.sector_shift()) + 1,
        }
    }
}

/// Outcome of [`RegionMap::copy_begin`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Begin {
    /// Copy now; commit with this word.
    Copy(u64),
    /// A write is in flight: try later.
    Busy,
    /// Already in sync; nothing to copy.
    Synced,
}

/// Outcome of [`RegionMap::verify_begin`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verify {
    /// Compare now; check with this word.
    Compare(u64),
    /// A write is in flight: try later.
    Busy,
    /// Not in sync: it needs a copy, not a comparison.
    NotSynced,
}

/// Outcome of [`RegionMap::copy_end`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum End {
    /// The region is in sync from now on.
    Committed,
    /// A write was submitted during the copy: copy again.
    Conflict,
}

/// The per-region words, over storage the caller owns (a kernel allocation
/// in the module, a `Vec` in userspace).
pub struct RegionMap<'a> {
    words: &'a [AtomicU64],
}

impl<'a> RegionMap<'a> {
    /// A map over `words`, which must hold one word per region, with
    /// nothing synced and nothing in flight (the epochs may start anywhere:
    /// the module starts them at a random value per attachment).
    pub const fn new(words: &'a [AtomicU64]) -> Self {
        Self { words }
    }

    /// Number of regions.
    pub fn len(&self) -> u64 {
        self.words.len() as u64
    }

    /// Whether the map has no regions.
    pub fn is_empty(&self) -> bool {
        self.words.is_empty()
    }

    fn word(&self, r: u64) -> Option<&AtomicU64> {
        self.words.get(usize::try_from(r).ok()?)
    }

    /// The current word of region `r` (0 past the end).
    pub fn load(&self, r: u64) -> u64 {
        match self.word(r) {
            Some(w) => w.load(Ordering::Acquire),
            None => 0,
        }
    }

    /// A write to `regions` is being submitted. Returns whether it must be
    /// mirrored to the target (some touched region was SYNCED).
    ///
    /// Every call must be matched by one [`RegionMap::write_complete`] on the
    /// same range once the write (all its legs) has completed.
    pub fn write_submit(&self, regions: Regions) -> bool {
        let mut mirror = false;
        let mut r = regions.start;
        while r < regions.end {
            if let Some(w) = self.word(r) {
                // AcqRel: the copier's commit (Release) of SYNCED must be seen
                // by this submission if it came first, and the copier's
                // compare-exchange must see this bump if it came first.
                let old = w.fetch_add(WRITE_SUBMIT, Ordering::AcqRel);
                mirror |= is_synced(old);
            }
            r += 1;
        }
        mirror
    }

    /// The write submitted with [`RegionMap::write_submit`] on `regions` has
    /// completed on every leg.
    pub fn write_complete(&self, regions: Regions) {
        let mut r = regions.start;
        while r < regions.end {
            if let Some(w) = self.word(r) {
                w.fetch_sub(INFLIGHT_ONE, Ordering::Release);
            }
            r += 1;
        }
    }

    /// The copier wants to copy region `r`.
    pub fn copy_begin(&self, r: u64) -> Option<Begin> {
        let word = self.word(r)?.load(Ordering::Acquire);
        Some(if is_synced(word) {
            Begin::Synced
        } else if inflight(word) != 0 {
            Begin::Busy
        } else {
            Begin::Copy(word)
        })
    }

    /// The copier has written region `r` to the target (and the write has
    /// completed); `begin` is the word [`RegionMap::copy_begin`] returned.
    pub fn copy_end(&self, r: u64, begin: u64) -> Option<End> {
        let w = self.word(r)?;
        if is_synced(begin) || inflight(begin) != 0 {
            // Not a word copy_begin hands out: never commit on it.
            return Some(End::Conflict);
        }
        Some(
            match w.compare_exchange(begin, begin | SYNCED, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => End::Committed,
                Err(_) => End::Conflict,
            },
        )
    }

    /// The copier wants to compare region `r` on both devices: a SYNCED
    /// region with no write in flight gives its word, which
    /// [`RegionMap::verify_end`] checks.
    pub fn verify_begin(&self, r: u64) -> Option<Verify> {
        let word = self.word(r)?.load(Ordering::Acquire);
        Some(if !is_synced(word) {
            Verify::NotSynced
        } else if inflight(word) != 0 {
            Verify::Busy
        } else {
            Verify::Compare(word)
        })
    }

    /// Whether a comparison of region `r` that started with `begin` holds:
    /// no write was submitted to the region since (every submission
    /// advances the epoch) and it is still SYNCED.
    pub fn verify_end(&self, r: u64, begin: u64) -> Option<bool> {
        let w = self.word(r)?;
        Some(is_synced(begin) && inflight(begin) == 0 && w.load(Ordering::Acquire) == begin)
    }

    /// Region `r` no longer tracks the source (a discard the target could
    /// not do): it must be copied again.
    pub fn unsync(&self, r: u64) {
        if let Some(w) = self.word(r) {
            w.fetch_and(!SYNCED, Ordering::AcqRel);
        }
    }

    /// Writes in flight over the whole device.
    pub fn inflight_total(&self) -> u64 {
        self.words
            .iter()
            .map(|w| inflight(w.load(Ordering::Acquire)))
            .sum()
    }

    /// Number of SYNCED regions.
    pub fn synced_count(&self) -> u64 {
        self.words
            .iter()
            .filter(|w| is_synced(w.load(Ordering::Acquire)))
            .count() as u64
    }

    /// Whether every region is SYNCED.
    pub fn all_synced(&self) -> bool {
        self.words
            .iter()
            .all(|w| is_synced(w.load(Ordering::Acquire)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geometry_cuts_a_short_last_region() {
        // 10 MiB + 4 KiB with 1 MiB regions: 10 full regions and a 4 KiB one.
        let g = Geometry::new((10 << 11) + 8, 20).unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(g.regions(), 11);
        assert_eq!(g.region_span(0), Some((0, 1 << 20)));
        assert_eq!(g.region_span(10), Some((10 << 20, 4096)));
        assert_eq!(g.region_span(11), None);
        assert_eq!(g.regions_of(0, 1), Regions { start: 0, end: 1 });
        assert_eq!(g.regions_of(2047, 2), Regions { start: 0, end: 2 });
        assert_eq!(g.regions_of(10 << 11, 100), Regions { start: 10, end: 11 });
        assert!(g.regions_of(0, 0).is_empty());
        assert!(g.regions_of(g.sectors(), 8).is_empty());
        assert_eq!(g.regions_of(u64::MAX - 1, 8), Regions { start: 0, end: 0 });
    }

    #[test]
    fn geometry_refuses_bad_shapes() {
        assert_eq!(Geometry::new(100, 11), Err(GeometryError::RegionSize));
        assert_eq!(Geometry::new(100, 31), Err(GeometryError::RegionSize));
        assert_eq!(Geometry::new(0, 20), Err(GeometryError::Empty));
    }

    #[test]
    fn the_head_is_128_kib_whatever_the_region_size() {
        let g = |sectors, shift| Geometry::new(sectors, shift).unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(crate::abi::RETIRE_BYTES, 128 << 10);
        assert_eq!(g(1 << 21, 22).head_bytes(), crate::abi::RETIRE_BYTES);
        // A copy writes what lies past the head.
        assert_eq!(g(1 << 21, 22).copy_range(0), Some((128 << 10, 1 << 22)));
        assert_eq!(g(1 << 21, 20).copy_range(0), Some((128 << 10, 1 << 20)));
        assert_eq!(g(1 << 21, 22).copy_range(1), Some((1 << 22, 2 << 22)));
        assert_eq!(g(1 << 21, 16).copy_range(1), None);
        assert_eq!(g(1 << 21, 16).copy_range(2), Some((2 << 16, 3 << 16)));
        assert_eq!(g(16, 20).copy_range(0), None);
        assert_eq!(g(1 << 21, 22).copy_range(256), None);
        assert_eq!(g(1 << 21, 22).head_len(0), 128 << 10);
        assert_eq!(g(1 << 21, 22).head_len(1), 0);
        // 64 KiB regions: the head is regions 0 and 1.
        let small = g(1 << 21, 16);
        assert_eq!(small.head_bytes(), 128 << 10);
        assert_eq!(small.head_len(1), 1 << 16);
        assert_eq!(small.head_len(2), 0);
        // A device smaller than the head.
        assert_eq!(g(16, 20).head_bytes(), 8192);
        assert_eq!(g(16, 20).head_len(0), 8192);
        let g = g(1 << 21, 20);
        assert!(g.touches_head(255, 1));
        assert!(!g.touches_head(256, 8));
        assert!(!g.touches_head(0, 0));
        assert!(g.within_head(248, 8));
        assert!(!g.within_head(248, 9));
        assert!(!g.within_head(u64::MAX, 2));
    }

    #[test]
    fn a_comparison_holds_only_without_a_write_since_it_began() {
        let words = [AtomicU64::new(0)];
        let m = RegionMap::new(&words);
        let r = Regions { start: 0, end: 1 };
        assert_eq!(m.verify_begin(0), Some(Verify::NotSynced));
        let Some(Begin::Copy(w)) = m.copy_begin(0) else {
            panic!("region should be copyable");
        };
        assert_eq!(m.copy_end(0, w), Some(End::Committed));
        let Some(Verify::Compare(v)) = m.verify_begin(0) else {
            panic!("a synced region should be comparable");
        };
        assert_eq!(m.verify_end(0, v), Some(true));
        // A write submitted (and completed) during the comparison voids it.
        assert!(m.write_submit(r));
        assert_eq!(m.verify_begin(0), Some(Verify::Busy));
        m.write_complete(r);
        assert_eq!(m.verify_end(0, v), Some(false));
        // A region unsynced during the comparison voids it too.
        let Some(Verify::Compare(v)) = m.verify_begin(0) else {
            panic!("a synced region should be comparable");
        };
        m.unsync(0);
        assert_eq!(m.verify_end(0, v), Some(false));
        assert_eq!(m.verify_end(1, v), None);
    }

    #[test]
    fn word_fields() {
        let w = 3 * EPOCH_ONE + 5 * INFLIGHT_ONE + SYNCED;
        assert_eq!((epoch(w), inflight(w), is_synced(w)), (3, 5, true));
    }

    #[test]
    fn protocol_steps_on_one_region() {
        let words = [AtomicU64::new(0)];
        let m = RegionMap::new(&words);
        let r = Regions { start: 0, end: 1 };
        // A write in flight makes the region busy, and a commit fails.
        assert!(!m.write_submit(r));
        assert_eq!(m.copy_begin(0), Some(Begin::Busy));
        m.write_complete(r);
        let Some(Begin::Copy(w)) = m.copy_begin(0) else {
            panic!("region should be copyable");
        };
        // A write that starts and ends inside the copy window is seen.
        assert!(!m.write_submit(r));
        m.write_complete(r);
        assert_eq!(m.copy_end(0, w), Some(End::Conflict));
        let Some(Begin::Copy(w)) = m.copy_begin(0) else {
            panic!("region should be copyable");
        };
        assert_eq!(m.copy_end(0, w), Some(End::Committed));
        assert_eq!(m.copy_begin(0), Some(Begin::Synced));
        assert!(m.all_synced());
        // From now on writes are mirrored; an unsync makes it copyable again.
        assert!(m.write_submit(r));
        m.write_complete(r);
        m.unsync(0);
        assert!(!m.all_synced());
        assert!(matches!(m.copy_begin(0), Some(Begin::Copy(_))));
        // Out of range.
        assert_eq!(m.copy_begin(1), None);
        assert_eq!(m.copy_end(1, 0), None);
    }
}
