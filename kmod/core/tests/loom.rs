//! Model checking of the copy protocol with loom: every interleaving of
//! writers and the copier (up to a preemption bound) is explored, and after
//! each one, every committed region must hold the source's data on the
//! target. The broken variants must be caught.
#![cfg(loom)]

mod common;

use std::sync::atomic::AtomicBool;
use std::sync::Arc as StdArc;

use blkmig_core::region::{Begin, End, Regions};
use common::{Proto, Variant};
use loom::sync::atomic::{AtomicU64, Ordering};
use loom::sync::Arc;
use loom::thread;

/// Blocks per region in the model: enough for a copy to read a region in
/// more than one step.
const BLOCKS: usize = 2;
/// Value the target holds before anything is copied.
const GARBAGE: u64 = 0xdead;

struct Disk {
    s: Vec<AtomicU64>,
    t: Vec<AtomicU64>,
}

impl Disk {
    fn new(regions: usize) -> Self {
        Self {
            s: (0..regions * BLOCKS).map(|_| AtomicU64::new(0)).collect(),
            t: (0..regions * BLOCKS)
                .map(|_| AtomicU64::new(GARBAGE))
                .collect(),
        }
    }
}

/// One write of value `v` to block `b`, covering `regions`: submission,
/// the source leg, the target leg if mirrored, completion.
fn write(p: &Proto, d: &Disk, regions: Regions, b: usize, v: u64) {
    let mirror = p.write_submit(regions);
    d.s[b].store(v, Ordering::Release);
    if mirror {
        d.t[b].store(v, Ordering::Release);
    }
    p.write_complete(regions);
}

/// The copier: tries region `r` until it commits or gives up.
fn copy(p: &Proto, d: &Disk, r: u64, tries: usize) {
    for _ in 0..tries {
        match p.copy_begin(r) {
            Begin::Synced => return,
            Begin::Busy => thread::yield_now(),
            Begin::Copy(w) => {
                let base = r as usize * BLOCKS;
                let data: Vec<u64> = (0..BLOCKS)
                    .map(|i| d.s[base + i].load(Ordering::Acquire))
                    .collect();
                for (i, v) in data.into_iter().enumerate() {
                    d.t[base + i].store(v, Ordering::Release);
                }
                if p.copy_end(r, w) == End::Committed {
                    return;
                }
            }
        }
    }
}

/// After all threads are done: a committed region holds the source's data.
fn check(p: &Proto, d: &Disk, regions: usize, violation: &AtomicBool) {
    for r in 0..regions {
        if !p.synced(r as u64) {
            continue;
        }
        for b in r * BLOCKS..(r + 1) * BLOCKS {
            let (s, t) = (
                d.s[b].load(Ordering::Acquire),
                d.t[b].load(Ordering::Acquire),
            );
            if s != t {
                violation.store(true, std::sync::atomic::Ordering::SeqCst);
            }
        }
    }
}

fn builder() -> loom::model::Builder {
    let mut b = loom::model::Builder::new();
    b.preemption_bound = Some(3);
    b
}

/// One region, one writer doing two writes to different blocks, the
/// copier. Returns whether any interleaving broke the invariant.
fn one_region(variant: Variant) -> bool {
    let violation = StdArc::new(AtomicBool::new(false));
    let v = violation.clone();
    builder().check(move || {
        let p = Proto::new(1, variant);
        let d = Arc::new(Disk::new(1));
        let r0 = Regions { start: 0, end: 1 };
        let (pw, dw) = (p.clone(), d.clone());
        let writer = thread::spawn(move || {
            write(&pw, &dw, r0, 0, 1);
            write(&pw, &dw, r0, 1, 2);
        });
        copy(&p, &d, 0, 3);
        writer.join().unwrap_or_default();
        check(&p, &d, 1, &v);
    });
    violation.load(std::sync::atomic::Ordering::SeqCst)
}

/// Two regions, a writer whose one write spans both (block 1 is the end of
/// region 0, block 2 the start of region 1), a second writer in region 1,
/// the copier copying both regions.
fn two_regions(variant: Variant) -> bool {
    let violation = StdArc::new(AtomicBool::new(false));
    let v = violation.clone();
    builder().check(move || {
        let p = Proto::new(2, variant);
        let d = Arc::new(Disk::new(2));
        let (p1, d1) = (p.clone(), d.clone());
        let spanning = thread::spawn(move || {
            // One bio over blocks 1 and 2: submit once for both regions.
            let both = Regions { start: 0, end: 2 };
            let mirror = p1.write_submit(both);
            d1.s[1].store(7, Ordering::Release);
            d1.s[2].store(7, Ordering::Release);
            if mirror {
                d1.t[1].store(7, Ordering::Release);
                d1.t[2].store(7, Ordering::Release);
            }
            p1.write_complete(both);
        });
        let (p2, d2) = (p.clone(), d.clone());
        let second = thread::spawn(move || {
            write(&p2, &d2, Regions { start: 1, end: 2 }, 3, 9);
        });
        copy(&p, &d, 0, 2);
        copy(&p, &d, 1, 2);
        spanning.join().unwrap_or_default();
        second.join().unwrap_or_default();
        check(&p, &d, 2, &v);
    });
    violation.load(std::sync::atomic::Ordering::SeqCst)
}

#[test]
fn correct_protocol_one_region() {
    assert!(!one_region(Variant::Correct), "the protocol lost a write");
}

#[test]
fn correct_protocol_two_regions() {
    assert!(!two_regions(Variant::Correct), "the protocol lost a write");
}

#[test]
fn catches_copy_begin_ignoring_writes_in_flight() {
    assert!(
        one_region(Variant::NoInflightCheck),
        "loom did not catch the broken variant"
    );
}

#[test]
fn catches_missing_epoch() {
    assert!(
        one_region(Variant::NoEpoch),
        "loom did not catch the broken variant"
    );
}

#[test]
fn catches_missing_epoch_two_regions() {
    assert!(
        two_regions(Variant::NoEpoch),
        "loom did not catch the broken variant"
    );
}
