//! The protocol as the tests drive it: the real region map, and variants
//! that are broken on purpose so that the checks are known to catch bugs.

#![allow(dead_code)]

use std::sync::Arc;

use blkmig_core::region::{self, Begin, End, RegionMap, Regions};
use blkmig_core::sync::{AtomicU64, Ordering};

/// Which protocol to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Variant {
    /// The protocol of the brief, as the kernel module runs it.
    Correct,
    /// Broken: COPY_BEGIN ignores writes in flight.
    NoInflightCheck,
    /// Broken: write submission does not move the epoch.
    NoEpoch,
}

/// A region map driven through one variant of the protocol.
#[derive(Clone)]
pub struct Proto {
    words: Arc<Vec<AtomicU64>>,
    variant: Variant,
}

impl Proto {
    /// `regions` unsynced regions.
    pub fn new(regions: usize, variant: Variant) -> Self {
        Self {
            words: Arc::new((0..regions).map(|_| AtomicU64::new(0)).collect()),
            variant,
        }
    }

    fn map(&self) -> RegionMap<'_> {
        RegionMap::new(&self.words)
    }

    /// Write submission; returns whether to mirror.
    pub fn write_submit(&self, r: Regions) -> bool {
        match self.variant {
            Variant::NoEpoch => {
                let mut mirror = false;
                for i in r.start..r.end {
                    let old =
                        self.words[i as usize].fetch_add(region::INFLIGHT_ONE, Ordering::AcqRel);
                    mirror |= region::is_synced(old);
                }
                mirror
            }
            _ => self.map().write_submit(r),
        }
    }

    /// Write completion.
    pub fn write_complete(&self, r: Regions) {
        self.map().write_complete(r)
    }

    /// Copy begin.
    pub fn copy_begin(&self, r: u64) -> Begin {
        match self.variant {
            Variant::NoInflightCheck => {
                let w = self.words[r as usize].load(Ordering::Acquire);
                if region::is_synced(w) {
                    Begin::Synced
                } else {
                    // Pretend nothing is in flight: commit on a word that
                    // has the in-flight bits cleared, as if they were not
                    // part of the word.
                    Begin::Copy(w)
                }
            }
            _ => self.map().copy_begin(r).unwrap_or(Begin::Busy),
        }
    }

    /// Copy end.
    pub fn copy_end(&self, r: u64, word: u64) -> End {
        match self.variant {
            Variant::NoInflightCheck => {
                // The epoch still protects writes submitted after begin; the
                // bug is only that in-flight ones are ignored at begin.
                let cur = self.words[r as usize].load(Ordering::Acquire);
                if region::epoch(cur) == region::epoch(word) {
                    self.words[r as usize].fetch_or(region::SYNCED, Ordering::AcqRel);
                    End::Committed
                } else {
                    End::Conflict
                }
            }
            _ => self.map().copy_end(r, word).unwrap_or(End::Conflict),
        }
    }

    /// Whether region `r` is SYNCED.
    pub fn synced(&self, r: u64) -> bool {
        region::is_synced(self.map().load(r))
    }

    /// Writes in flight in region `r`.
    pub fn inflight(&self, r: u64) -> u64 {
        region::inflight(self.map().load(r))
    }

    /// Whether every region is SYNCED.
    pub fn all_synced(&self) -> bool {
        self.map().all_synced()
    }
}
