//! Whole migrations on a simulated device, property-tested.
//!
//! Writers, the copier and the switch are step machines; proptest chooses
//! which one takes the next step, so every run is one reproducible (and
//! shrinkable) interleaving. Each write has independent source and target
//! legs that advance sector by sector. After every step the invariant is
//! checked: a SYNCED region with no write in flight holds the same data on
//! the target as on the source. At the switch (writes held, in-flight writes
//! drained, the last regions copied) the target must equal the source.
//!
//! A second test runs the same protocol with real OS threads.
#![cfg(not(loom))]

mod common;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use blkmig_core::region::{Begin, End, Geometry, Regions};
use common::{Proto, Variant};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestError, TestRunner};

/// 4 KiB regions = 8 sectors; 6 full regions and a short one of 3 sectors.
const SECTORS: u64 = 6 * 8 + 3;
const SHIFT: u32 = 12;
const GARBAGE: u32 = u32::MAX;

fn geometry() -> Geometry {
    Geometry::new(SECTORS, SHIFT).unwrap_or_else(|e| panic!("geometry: {e:?}"))
}

/// A write request: `len` sectors from `start` (clamped at the device end,
/// like the block layer refuses nothing past it in this model).
#[derive(Clone, Copy, Debug)]
struct Req {
    start: u64,
    len: u64,
}

#[derive(Clone, Debug)]
enum WState {
    Idle,
    /// Legs in progress: next source and target sector, whether mirrored.
    Legs {
        id: u32,
        req: Req,
        regions: Regions,
        mirror: bool,
        s: u64,
        t: u64,
    },
}

#[derive(Clone, Debug)]
struct Writer {
    ops: VecDeque<Req>,
    state: WState,
}

#[derive(Clone, Debug)]
enum CState {
    Pick,
    Read {
        r: u64,
        word: u64,
        pos: u64,
        buf: Vec<u32>,
    },
    Write {
        r: u64,
        word: u64,
        pos: u64,
        buf: Vec<u32>,
    },
    Done,
}

struct Sim {
    geo: Geometry,
    proto: Proto,
    s: Vec<u32>,
    t: Vec<u32>,
    writers: Vec<Writer>,
    copier: CState,
    queue: VecDeque<u64>,
    next_id: u32,
    /// Writes are held for the switch.
    holding: bool,
    switched: bool,
}

impl Sim {
    fn new(variant: Variant, ops: Vec<Vec<Req>>) -> Self {
        let geo = geometry();
        Self {
            geo,
            proto: Proto::new(geo.regions() as usize, variant),
            s: (0..SECTORS as u32).collect(),
            t: vec![GARBAGE; SECTORS as usize],
            writers: ops
                .into_iter()
                .map(|o| Writer {
                    ops: o.into(),
                    state: WState::Idle,
                })
                .collect(),
            copier: CState::Pick,
            queue: (0..geo.regions()).collect(),
            next_id: 1_000,
            holding: false,
            switched: false,
        }
    }

    fn span(&self, r: u64) -> (u64, u64) {
        let (off, len) = self.geo.region_span(r).unwrap_or((0, 0));
        (off >> 9, len >> 9)
    }

    fn overlaps_inflight(&self, me: usize, req: Req) -> bool {
        self.writers
            .iter()
            .enumerate()
            .any(|(i, w)| match &w.state {
                WState::Legs { req: o, .. } if i != me => {
                    req.start < o.start + o.len && o.start < req.start + req.len
                }
                _ => false,
            })
    }

    /// Which actors can step: writers 0..n, then the copier at n.
    fn enabled(&self) -> Vec<usize> {
        let mut v = Vec::new();
        for (i, w) in self.writers.iter().enumerate() {
            let ok = match &w.state {
                WState::Legs { .. } => true,
                // A filesystem does not overlap its own writes in flight;
                // held writes wait for the switch.
                WState::Idle => match w.ops.front() {
                    Some(&req) => !self.holding && !self.overlaps_inflight(i, req),
                    None => false,
                },
            };
            if ok {
                v.push(i);
            }
        }
        if !matches!(self.copier, CState::Done) {
            v.push(self.writers.len());
        }
        v
    }

    fn step_writer(&mut self, i: usize) {
        let state = self.writers[i].state.clone();
        match state {
            WState::Idle => {
                let Some(req) = self.writers[i].ops.pop_front() else {
                    return;
                };
                let req = Req {
                    start: req.start,
                    len: req.len.min(SECTORS - req.start),
                };
                let regions = self.geo.regions_of(req.start, req.len);
                self.next_id += 1;
                if self.switched {
                    // REDIRECT: the write goes to the target only. The source
                    // is kept as the reference of what the device holds.
                    for sec in req.start..req.start + req.len {
                        self.t[sec as usize] = self.next_id;
                        self.s[sec as usize] = self.next_id;
                    }
                    return;
                }
                let mirror = self.proto.write_submit(regions);
                self.writers[i].state = WState::Legs {
                    id: self.next_id,
                    req,
                    regions,
                    mirror,
                    s: req.start,
                    t: req.start,
                };
            }
            WState::Legs {
                id,
                req,
                regions,
                mirror,
                s,
                t,
            } => {
                let end = req.start + req.len;
                // Advance whichever leg is behind; legs are independent, so
                // alternate by parity of the id to vary the order.
                let t_pending = mirror && t < end;
                if s < end && (!t_pending || (id + s as u32) % 2 == 0) {
                    self.s[s as usize] = id;
                    self.writers[i].state = WState::Legs {
                        id,
                        req,
                        regions,
                        mirror,
                        s: s + 1,
                        t,
                    };
                } else if t_pending {
                    self.t[t as usize] = id;
                    self.writers[i].state = WState::Legs {
                        id,
                        req,
                        regions,
                        mirror,
                        s,
                        t: t + 1,
                    };
                } else {
                    self.proto.write_complete(regions);
                    self.writers[i].state = WState::Idle;
                }
            }
        }
    }

    fn writes_in_flight(&self) -> bool {
        self.writers
            .iter()
            .any(|w| matches!(w.state, WState::Legs { .. }))
    }

    fn step_copier(&mut self) -> Result<(), TestCaseError> {
        let state = std::mem::replace(&mut self.copier, CState::Pick);
        self.copier = match state {
            CState::Pick => match self.queue.pop_front() {
                Some(r) => match self.proto.copy_begin(r) {
                    Begin::Copy(word) => CState::Read {
                        r,
                        word,
                        pos: 0,
                        buf: Vec::new(),
                    },
                    Begin::Synced => CState::Pick,
                    Begin::Busy => {
                        self.queue.push_back(r);
                        CState::Pick
                    }
                },
                None if !self.holding => {
                    // Everything synced at least once: hold writes for the
                    // switch (in-flight ones keep draining).
                    self.holding = true;
                    self.queue = (0..self.geo.regions())
                        .filter(|&r| !self.proto.synced(r))
                        .collect();
                    CState::Pick
                }
                None if self.writes_in_flight() => CState::Pick,
                None => {
                    // Drained: copy what is still unsynced, then switch.
                    let left: VecDeque<u64> = (0..self.geo.regions())
                        .filter(|&r| !self.proto.synced(r))
                        .collect();
                    if left.is_empty() {
                        prop_assert!(self.proto.all_synced());
                        prop_assert_eq!(
                            &self.t,
                            &self.s,
                            "target differs from source at the switch"
                        );
                        self.switched = true;
                        self.holding = false;
                        CState::Done
                    } else {
                        self.queue = left;
                        CState::Pick
                    }
                }
            },
            CState::Read {
                r,
                word,
                pos,
                mut buf,
            } => {
                let (first, len) = self.span(r);
                buf.push(self.s[(first + pos) as usize]);
                if pos + 1 == len {
                    CState::Write {
                        r,
                        word,
                        pos: 0,
                        buf,
                    }
                } else {
                    CState::Read {
                        r,
                        word,
                        pos: pos + 1,
                        buf,
                    }
                }
            }
            CState::Write { r, word, pos, buf } => {
                let (first, len) = self.span(r);
                self.t[(first + pos) as usize] = buf[pos as usize];
                if pos + 1 < len {
                    CState::Write {
                        r,
                        word,
                        pos: pos + 1,
                        buf,
                    }
                } else {
                    // The copy's target write has completed: commit.
                    if self.proto.copy_end(r, word) == End::Conflict {
                        self.queue.push_back(r);
                    }
                    CState::Pick
                }
            }
            CState::Done => CState::Done,
        };
        Ok(())
    }

    /// SYNCED and quiet regions hold the same data on both sides.
    fn check_invariant(&self) -> Result<(), TestCaseError> {
        if self.switched {
            return Ok(());
        }
        for r in 0..self.geo.regions() {
            if self.proto.synced(r) && self.proto.inflight(r) == 0 {
                let (first, len) = self.span(r);
                let range = first as usize..(first + len) as usize;
                prop_assert_eq!(
                    &self.t[range.clone()],
                    &self.s[range],
                    "region {} is SYNCED but stale",
                    r
                );
            }
        }
        Ok(())
    }

    fn run(mut self, schedule: &[u16]) -> Result<(), TestCaseError> {
        let mut choices = schedule.iter();
        let mut steps = 0u32;
        loop {
            let en = self.enabled();
            if en.is_empty() {
                break;
            }
            steps += 1;
            prop_assert!(steps < 200_000, "simulation does not terminate");
            // Follow the schedule while it lasts, then round-robin.
            let pick = match choices.next() {
                Some(&c) => en[c as usize % en.len()],
                None => en[steps as usize % en.len()],
            };
            if pick == self.writers.len() {
                self.step_copier()?;
            } else {
                self.step_writer(pick);
            }
            self.check_invariant()?;
        }
        prop_assert!(self.switched, "the migration never switched");
        prop_assert_eq!(
            &self.t,
            &self.s,
            "target differs from the device's contents after the switch"
        );
        Ok(())
    }
}

fn req() -> impl Strategy<Value = Req> {
    // Random sizes, biased towards spanning regions and the device end.
    (0..SECTORS, 1u64..20).prop_map(|(start, len)| Req { start, len })
}

fn ops() -> impl Strategy<Value = Vec<Vec<Req>>> {
    prop::collection::vec(prop::collection::vec(req(), 1..12), 2..=4)
}

fn schedule() -> impl Strategy<Value = Vec<u16>> {
    prop::collection::vec(any::<u16>(), 50..600)
}

/// One generated case: each writer's requests, and the schedule.
type Case = (Vec<Vec<Req>>, Vec<u16>);

/// Runs `cases` random migrations; returns the first failure, if any.
fn migrations(variant: Variant, cases: u32) -> Result<(), TestError<Case>> {
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    });
    runner.run(&(ops(), schedule()), |(ops, sched)| {
        Sim::new(variant, ops).run(&sched)
    })
}

/// The failure is stale data on the target, not some other symptom.
fn caught_by_data_check(why: &impl std::fmt::Display) -> bool {
    let why = why.to_string();
    why.contains("SYNCED but stale") || why.contains("differs from source")
}

#[test]
fn migrations_end_with_target_equal_to_source() {
    if let Err(e) = migrations(Variant::Correct, 2_000) {
        panic!("{e}");
    }
}

#[test]
fn catches_copy_begin_ignoring_writes_in_flight() {
    match migrations(Variant::NoInflightCheck, 2_000) {
        Err(TestError::Fail(why, case)) if caught_by_data_check(&why) => {
            eprintln!("caught as expected: {why} with {case:?}")
        }
        other => panic!("the broken variant was not caught: {other:?}"),
    }
}

#[test]
fn catches_missing_epoch() {
    match migrations(Variant::NoEpoch, 2_000) {
        Err(TestError::Fail(why, _)) if caught_by_data_check(&why) => {
            eprintln!("caught as expected: {why}")
        }
        other => panic!("the broken variant was not caught: {other:?}"),
    }
}

/// The same protocol with real threads: writers, each with a region of the
/// device it owns plus a shared stripe it takes a lock for, the copier, the
/// switch. After the switch the target equals the source.
#[test]
fn threaded_migration_converges() {
    let geo = geometry();
    let n = SECTORS as usize;
    for round in 0..50u32 {
        let proto = Proto::new(geo.regions() as usize, Variant::Correct);
        let s: Arc<Vec<AtomicU32>> = Arc::new((0..n as u32).map(AtomicU32::new).collect());
        let t: Arc<Vec<AtomicU32>> = Arc::new((0..n).map(|_| AtomicU32::new(GARBAGE)).collect());
        // Range lock: writers never overlap writes in flight; `held` is the
        // switch's write hold.
        let gate = Arc::new((Mutex::new((vec![false; n], false)), Condvar::new()));
        let mut threads = Vec::new();
        for w in 0..3u32 {
            let (proto, s, t, gate) = (proto.clone(), s.clone(), t.clone(), gate.clone());
            threads.push(std::thread::spawn(move || {
                let mut x = (round + 1) * 7919 + w * 104_729;
                for k in 0..300u32 {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    let start = (x as u64) % SECTORS;
                    let len = (1 + (x >> 8) as u64 % 19).min(SECTORS - start);
                    let (lo, hi) = (start as usize, (start + len) as usize);
                    {
                        let (m, cv) = &*gate;
                        let mut g = m.lock().unwrap_or_else(|e| e.into_inner());
                        while g.1 || g.0[lo..hi].iter().any(|&b| b) {
                            g = cv.wait(g).unwrap_or_else(|e| e.into_inner());
                        }
                        g.0[lo..hi].iter_mut().for_each(|b| *b = true);
                    }
                    let regions = geometry().regions_of(start, len);
                    let mirror = proto.write_submit(regions);
                    let id = (w + 1) << 20 | k;
                    for sec in lo..hi {
                        s[sec].store(id, Ordering::Release);
                        std::thread::yield_now();
                        if mirror {
                            t[sec].store(id, Ordering::Release);
                        }
                    }
                    proto.write_complete(regions);
                    let (m, cv) = &*gate;
                    let mut g = m.lock().unwrap_or_else(|e| e.into_inner());
                    g.0[lo..hi].iter_mut().for_each(|b| *b = false);
                    cv.notify_all();
                }
            }));
        }
        // The copier: one pass with retries, then the switch.
        let copy_region = |r: u64| -> bool {
            let Begin::Copy(word) = proto.copy_begin(r) else {
                return proto.synced(r);
            };
            let (off, len) = geo.region_span(r).unwrap_or((0, 0));
            let (lo, hi) = ((off >> 9) as usize, ((off + len) >> 9) as usize);
            let data: Vec<u32> = (lo..hi).map(|i| s[i].load(Ordering::Acquire)).collect();
            std::thread::yield_now();
            for (i, v) in (lo..hi).zip(data) {
                t[i].store(v, Ordering::Release);
            }
            proto.copy_end(r, word) == End::Committed
        };
        for _ in 0..20 {
            for r in 0..geo.regions() {
                copy_region(r);
            }
        }
        // Switch: hold, drain, copy the rest, check.
        {
            let (m, cv) = &*gate;
            let mut g = m.lock().unwrap_or_else(|e| e.into_inner());
            g.1 = true;
            while g.0.iter().any(|&b| b) {
                g = cv.wait(g).unwrap_or_else(|e| e.into_inner());
            }
        }
        for r in 0..geo.regions() {
            assert!(
                copy_region(r),
                "round {round}: region {r} cannot be copied with writes held"
            );
        }
        assert!(proto.all_synced());
        let sv: Vec<u32> = s.iter().map(|a| a.load(Ordering::Acquire)).collect();
        let tv: Vec<u32> = t.iter().map(|a| a.load(Ordering::Acquire)).collect();
        assert_eq!(
            tv, sv,
            "round {round}: target differs from source at the switch"
        );
        {
            let (m, cv) = &*gate;
            m.lock().unwrap_or_else(|e| e.into_inner()).1 = false;
            cv.notify_all();
        }
        // After the switch writes go to the target only; let them finish
        // and stop here (the model has no redirect on this side).
        for th in threads {
            // Writers still running write S and maybe T; the check above is
            // the point of this test.
            th.join().unwrap_or_else(|_| panic!("writer panicked"));
        }
    }
}
