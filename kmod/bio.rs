// SPDX-License-Identifier: GPL-2.0-only
//! Bios: the owned [`Bio`] the filter is handed, a [`BioList`] of held
//! bios, [`BioSet`]s, and the clones the filter sends to the source and the
//! target with their completion.
//!
//! Every bio the filter takes is finished by [`leg_done`] once all the
//! clones it sent out (one to the source, maybe one to the target; or one
//! to the target alone) have completed. The per-bio context lives in the
//! front pad of the first clone (its "holder"), allocated from a bio set
//! with `GFP_NOIO`: the allocation is backed by a mempool, so it neither
//! fails nor recurses into the filtered device.

use core::{
    ffi::c_void,
    mem::size_of,
    ptr::{self, NonNull},
    sync::atomic::{AtomicPtr, AtomicU32, AtomicU8, Ordering},
};

use kernel::{bindings, error::to_result, prelude::*, types::Opaque};

use crate::{bdev::BlockDevice, migration::Migration, region::Regions};

/// The negative errno of a `blk_status_t`.
pub(crate) fn status_errno(status: u8) -> i32 {
    // SAFETY: `blk_status_to_errno` only maps a number.
    unsafe { bindings::blk_status_to_errno(status) }
}

/// Operation of a bio (`REQ_OP_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Op {
    /// `REQ_OP_READ`.
    Read,
    /// `REQ_OP_WRITE` (possibly an empty PREFLUSH).
    Write,
    /// `REQ_OP_DISCARD` or `REQ_OP_SECURE_ERASE`.
    Discard,
    /// `REQ_OP_WRITE_ZEROES`.
    WriteZeroes,
    /// Anything else (zone management, driver private).
    Other,
}

/// A bio the filter owns: handed over by the filter hook, it must be
/// completed ([`Bio::end`]), resubmitted ([`Bio::submit`]), sent on as
/// clones ([`send`]), or given back to the hook ([`Bio::into_raw`]).
///
/// # Invariants
///
/// The pointer is a live bio owned by this object.
pub(crate) struct Bio(NonNull<bindings::bio>);

// SAFETY: A bio may be completed or submitted from any thread.
unsafe impl Send for Bio {}

impl Bio {
    /// Takes ownership of a bio.
    ///
    /// # Safety
    ///
    /// `ptr` must be a live bio whose ownership the caller hands over.
    pub(crate) unsafe fn from_raw(ptr: *mut bindings::bio) -> Option<Self> {
        // INVARIANT: Ownership is handed over by the caller.
        NonNull::new(ptr).map(Self)
    }

    /// Gives up ownership (to the hook, which lets the bio pass).
    pub(crate) fn into_raw(self) -> *mut bindings::bio {
        let p = self.0.as_ptr();
        core::mem::forget(self);
        p
    }

    fn raw(&self) -> *mut bindings::bio {
        self.0.as_ptr()
    }

    fn opf(&self) -> u32 {
        // SAFETY: The bio is live and ours (type invariant).
        unsafe { (*self.raw()).bi_opf }
    }

    /// Completes the bio as `bio_wouldblock_error()` does: with
    /// `BLK_STS_AGAIN`, which its submitter, who asked not to wait, retries.
    pub(crate) fn end_would_block(self) {
        self.end(STS_AGAIN);
    }

    /// Whether the submitter asked not to wait (`REQ_NOWAIT`): a bio that
    /// would have to is completed with `BLK_STS_AGAIN` instead.
    pub(crate) fn nowait(&self) -> bool {
        self.opf() & bindings::REQ_NOWAIT != 0
    }

    /// The bio's operation.
    pub(crate) fn op(&self) -> Op {
        match self.opf() & bindings::REQ_OP_MASK {
            bindings::req_op_REQ_OP_READ => Op::Read,
            bindings::req_op_REQ_OP_WRITE => Op::Write,
            bindings::req_op_REQ_OP_DISCARD | bindings::req_op_REQ_OP_SECURE_ERASE => Op::Discard,
            bindings::req_op_REQ_OP_WRITE_ZEROES => Op::WriteZeroes,
            _ => Op::Other,
        }
    }

    /// First sector relative to the whole disk, whether or not the
    /// partition offset has been added yet.
    pub(crate) fn disk_sector(&self) -> u64 {
        // SAFETY: The bio is live and ours.
        unsafe { bindings::blkfilter_bio_sector(self.raw()) }
    }

    /// Length in 512-byte sectors (0 for an empty flush).
    pub(crate) fn nr_sectors(&self) -> u64 {
        // SAFETY: The bio is live and ours.
        u64::from(unsafe { (*self.raw()).bi_iter.bi_size }) >> crate::region::SECTOR_SHIFT
    }

    /// Whether the bio was submitted to `bdev` itself (not to its whole
    /// disk or to another partition).
    pub(crate) fn is_for(&self, bdev: &BlockDevice) -> bool {
        // SAFETY: The bio is live and ours.
        unsafe { (*self.raw()).bi_bdev == bdev.as_ptr() }
    }

    /// Completes the bio with `status` (a `blk_status_t`).
    pub(crate) fn end(self, status: u8) {
        let p = self.into_raw();
        // SAFETY: We owned the bio; it is completed once, here.
        unsafe {
            (*p).bi_status = status;
            bindings::bio_endio(p);
        }
    }

    /// Submits the bio again to the device it was submitted to. It has
    /// been through the filter hook already (`BIO_FILTERED`), so it goes
    /// down the normal path. Process context only.
    pub(crate) fn submit(self) {
        // SAFETY: We owned the bio; `submit_bio_noacct` takes it over.
        unsafe { bindings::submit_bio_noacct(self.into_raw()) };
    }
}

impl Drop for Bio {
    fn drop(&mut self) {
        // Every path finishes its bios explicitly; a bio dropped by mistake
        // is failed rather than leaked, so that its submitter is not left
        // waiting, and said loudly.
        pr_err!("a bio was dropped without being finished: failed with EIO\n");
        // SAFETY: We own the bio; it is completed once, here.
        unsafe {
            (*self.raw()).bi_status = bindings::BLK_STS_IOERR;
            bindings::bio_endio(self.raw());
        }
    }
}

/// A list of owned bios (`struct bio_list`), in submission order.
pub(crate) struct BioList(bindings::bio_list);

// SAFETY: The list owns its bios, which may move between threads.
unsafe impl Send for BioList {}

impl BioList {
    /// An empty list.
    pub(crate) const fn new() -> Self {
        Self(bindings::bio_list {
            head: ptr::null_mut(),
            tail: ptr::null_mut(),
        })
    }

    /// Appends `bio`.
    pub(crate) fn push(&mut self, bio: Bio) {
        // SAFETY: The list is valid; it takes over the bio.
        unsafe { bindings::bio_list_add(&mut self.0, bio.into_raw()) };
    }

    /// Removes the first bio.
    pub(crate) fn pop(&mut self) -> Option<Bio> {
        // SAFETY: The list is valid and owns its bios.
        unsafe { Bio::from_raw(bindings::bio_list_pop(&mut self.0)) }
    }

    /// Takes every bio, leaving the list empty.
    pub(crate) fn take(&mut self) -> Self {
        core::mem::replace(self, Self::new())
    }
}

impl Drop for BioList {
    fn drop(&mut self) {
        while let Some(bio) = self.pop() {
            drop(bio);
        }
    }
}

/// A `struct bio_set`, exited on drop.
#[pin_data(PinnedDrop)]
pub(crate) struct BioSet {
    #[pin]
    inner: Opaque<bindings::bio_set>,
}

impl BioSet {
    /// A bio set of `pool` reserved bios with `front_pad` bytes before each
    /// and, with `bvecs`, a reserve of bio_vec arrays for bios of their
    /// own pages.
    pub(crate) fn new(pool: u32, front_pad: u32, bvecs: bool) -> impl PinInit<Self, Error> {
        let mut flags = bindings::BIOSET_NEED_RESCUER;
        if bvecs {
            flags |= bindings::BIOSET_NEED_BVECS;
        }
        let init = move |slot: *mut Self| {
            // SAFETY: `slot` is valid, pinned memory for a `BioSet`.
            let set = unsafe { Opaque::raw_get(ptr::addr_of!((*slot).inner)) };
            // SAFETY: `set` is valid for a `bio_set`. `bioset_init` expects
            // zeroed memory, then initialises it or fails leaving nothing
            // to undo.
            to_result(unsafe {
                ptr::write_bytes(set, 0, 1);
                bindings::bioset_init(set, pool, front_pad, flags as i32)
            })
        };
        // SAFETY: On success `init` has initialised the only field; on
        // error nothing needs dropping.
        unsafe { kernel::init::pin_init_from_closure(init) }
    }

    fn as_ptr(&self) -> *mut bindings::bio_set {
        self.inner.get()
    }

    /// A clone of `orig` for `dev`, with the same sectors, allocated with
    /// `GFP_NOIO`. Clones are never polled (nobody polls their queue, the
    /// original's submitter polls the original), so `REQ_POLLED` is
    /// cleared. `None` only if the allocation failed (the mempool makes
    /// that impossible in practice).
    fn clone_of(&self, orig: &Bio, dev: &BlockDevice) -> Option<NonNull<bindings::bio>> {
        // SAFETY: `orig` is live and ours, `dev` is live, the set is
        // initialised.
        let c = unsafe {
            bindings::bio_alloc_clone(dev.as_ptr(), orig.raw(), bindings::GFP_NOIO, self.as_ptr())
        };
        let c = NonNull::new(c)?;
        // SAFETY: The clone is ours until submitted.
        unsafe { (*c.as_ptr()).bi_opf &= !bindings::REQ_POLLED };
        Some(c)
    }

    /// A bio of operation and flags `opf` on `dev` at `sector` (relative
    /// to `dev`) of `n` pages, `page_at(i)` giving page `i` and its length,
    /// completed by [`sync_end`] into `io`. `None` if the pages do not fit
    /// one bio. Allocates with `GFP_NOIO`.
    pub(crate) fn page_bio<'a>(
        &self,
        dev: &BlockDevice,
        sector: u64,
        opf: u32,
        n: usize,
        page_at: impl Fn(usize) -> (&'a kernel::page::Page, u32),
        io: &SyncIo,
    ) -> Option<PageBio> {
        let bio = self.own_bio(dev, sector, opf, u16::try_from(n).ok()?, io)?;
        for i in 0..n {
            let (page, len) = page_at(i);
            // SAFETY: The bio is ours until submitted, with room for `n`
            // pages. The pages outlive the I/O: their owner waits for `io`
            // before it frees them.
            if unsafe { bindings::bio_add_page(bio.0.as_ptr(), page.as_ptr(), len, 0) }
                != len as i32
            {
                return None;
            }
        }
        Some(bio)
    }

    /// A bio of the filter's own on `dev` at `sector` (relative to `dev`),
    /// with room for `vecs` pages, flagged so that no filter takes it, and
    /// completed by [`sync_end`] into `io`. Allocates with `GFP_NOIO`; the
    /// set must have bio_vec pools if `vecs` is not 0.
    fn own_bio(
        &self,
        dev: &BlockDevice,
        sector: u64,
        opf: u32,
        vecs: u16,
        io: &SyncIo,
    ) -> Option<PageBio> {
        // SAFETY: `dev` is live, the set initialised (with bio_vec pools
        // where pages are added); GFP_NOIO waits for the mempool instead of
        // failing or recursing into a filtered device.
        let bio = unsafe {
            bindings::bio_alloc_bioset(dev.as_ptr(), vecs, opf, bindings::GFP_NOIO, self.as_ptr())
        };
        let bio = NonNull::new(bio)?;
        let b = bio.as_ptr();
        // SAFETY: `b` is ours until submitted; `io` outlives the I/O (its
        // owner waits for it before it goes).
        unsafe {
            (*b).bi_iter.bi_sector = sector;
            bindings::bio_set_flag(b, bindings::BIO_FILTERED);
            (*b).bi_end_io = Some(sync_end);
            (*b).bi_private = ptr::from_ref(io).cast_mut().cast::<c_void>();
        }
        Some(PageBio(bio))
    }
}

#[pinned_drop]
impl PinnedDrop for BioSet {
    fn drop(self: Pin<&mut Self>) {
        // SAFETY: The set was initialised by `new`, and every bio allocated
        // from it has been freed: its owner waits for its bios first.
        unsafe { bindings::bioset_exit(self.inner.get()) };
    }
}

/// The filter's own I/O in the switch (flushes, the head read, the retire
/// marker): one bio at a time, submitted from a worker so that a submission
/// that blocks (a frozen queue, no free tag) never blocks the switch, and
/// cancellable until the worker has taken it. A count of bios in flight and
/// the last error; the waiters are woken through the owner's wait queue.
pub(crate) struct SyncIo {
    pending: AtomicU32,
    status: AtomicU8,
    /// A bio handed to the worker and not taken by it yet.
    queued: AtomicPtr<bindings::bio>,
    events: *const crate::wait::WaitQueue,
}

// SAFETY: Atomics, and a pointer to a wait queue that is `Sync`.
unsafe impl Send for SyncIo {}
// SAFETY: See `Send`.
unsafe impl Sync for SyncIo {}

impl SyncIo {
    /// An idle `SyncIo` that wakes `events`.
    ///
    /// # Safety
    ///
    /// `events` must outlive the `SyncIo` and every I/O it tracks.
    pub(crate) const unsafe fn new(events: *const crate::wait::WaitQueue) -> Self {
        Self {
            pending: AtomicU32::new(0),
            status: AtomicU8::new(0),
            queued: AtomicPtr::new(ptr::null_mut()),
            events,
        }
    }

    /// Whether no I/O is queued or in flight.
    pub(crate) fn idle(&self) -> bool {
        self.pending.load(Ordering::Acquire) == 0
    }

    /// Hands `bio` to the worker after clearing the previous status; the
    /// caller then runs [`SyncIo::submit_queued`] from the worker. Must be
    /// idle.
    pub(crate) fn queue(&self, bio: PageBio) -> Result {
        if !self.idle() {
            return Err(EBUSY);
        }
        self.status.store(0, Ordering::Relaxed);
        self.pending.fetch_add(1, Ordering::AcqRel);
        let b = bio.0.as_ptr();
        core::mem::forget(bio);
        self.queued.store(b, Ordering::Release);
        Ok(())
    }

    /// Submits the queued bio, if it was not cancelled. Process context
    /// (the worker); may block while the device cannot take it.
    pub(crate) fn submit_queued(&self) {
        let b = self.queued.swap(ptr::null_mut(), Ordering::AcqRel);
        if !b.is_null() {
            // SAFETY: A complete bio we own; its completion is `sync_end`.
            unsafe { bindings::submit_bio_noacct(b) };
        }
    }

    /// Takes the queued bio back if the worker has not submitted it yet.
    /// Returns whether it did: then the I/O never happened.
    pub(crate) fn cancel(&self) -> bool {
        let b = self.queued.swap(ptr::null_mut(), Ordering::AcqRel);
        if b.is_null() {
            return false;
        }
        // SAFETY: Never submitted: ours to put.
        unsafe { bindings::bio_put(b) };
        self.one_done();
        true
    }

    /// One bio is finished (completed or taken back): the last wakes the
    /// waiters, inside an RCU read-side section (the owner waits for a grace
    /// period after the count reached 0 before it frees the wait queue).
    fn one_done(&self) {
        let _rcu = crate::sys::rcu_read_lock();
        if self.pending.fetch_sub(1, Ordering::AcqRel) == 1 {
            // SAFETY: The wait queue outlives `self` (`new`'s requirement).
            unsafe { (*self.events).wake_all() };
        }
    }

    /// An empty PREFLUSH to `dev`, to hand to [`SyncIo::queue`].
    pub(crate) fn flush_bio(&self, set: &BioSet, dev: &BlockDevice) -> Result<PageBio> {
        let opf = bindings::req_op_REQ_OP_WRITE | bindings::REQ_PREFLUSH | bindings::REQ_SYNC;
        set.own_bio(dev, 0, opf, 0, self).ok_or(ENOMEM)
    }

    /// The result of the I/O that has finished: `Ok` or the errno.
    pub(crate) fn result(&self) -> Result {
        match self.status.load(Ordering::Acquire) {
            0 => Ok(()),
            s => Err(Error::from_errno(status_errno(s))),
        }
    }
}

/// A bio of the filter's own pages, not submitted yet.
pub(crate) struct PageBio(NonNull<bindings::bio>);

impl Drop for PageBio {
    fn drop(&mut self) {
        // SAFETY: Never submitted: ours to put.
        unsafe { bindings::bio_put(self.0.as_ptr()) };
    }
}

/// # Safety
///
/// Called by the block layer for a bio made by [`BioSet::page_bio`].
unsafe extern "C" fn sync_end(bio: *mut bindings::bio) {
    // SAFETY: `bi_private` is the `SyncIo` that submitted the bio; it
    // outlives its I/O (its owner waits for `pending` to drop, then for an
    // RCU grace period, before it goes), as does its wait queue.
    unsafe {
        let io = &*(*bio).bi_private.cast::<SyncIo>();
        let status = (*bio).bi_status;
        if status != 0 {
            io.status.store(status, Ordering::Release);
        }
        bindings::bio_put(bio);
        io.one_done();
    }
}

/// What a context is for.
#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Kind {
    /// A write in CLONE mode, accounted in the region map.
    Write,
    /// A bio redirected to the target.
    Redirect,
    /// A read of the first region sent to the source, tracked for the switch.
    HeadRead,
}

/// State of one bio the filter took, in the front pad of its holder clone.
#[repr(C)]
struct Ctx {
    orig: *mut bindings::bio,
    holder: *mut bindings::bio,
    mig: *const Migration,
    start: u64,
    end: u64,
    pending: AtomicU32,
    status: AtomicU8,
    kind: Kind,
}

/// Bytes of front pad a context needs (a multiple of 8, as `struct bio` is
/// 8-byte aligned after it).
pub(crate) const CTX_PAD: u32 = ((size_of::<Ctx>() + 7) & !7) as u32;

/// Where [`send`] sends a bio's clones.
pub(crate) struct Legs<'a> {
    /// A clone to the device and sector the bio was submitted to.
    pub(crate) source: bool,
    /// A clone to this device at this sector.
    pub(crate) target: Option<(&'a BlockDevice, u64)>,
}

/// Sends clones of `orig` to `legs` and finishes `orig` when they have all
/// completed, with the status of the source leg (of the target leg if
/// there is no source leg). `ctx_set` has [`CTX_PAD`] bytes of front pad.
/// `BLK_STS_AGAIN` of `include/linux/blk_types.h` (the bindings lack it).
const STS_AGAIN: u8 = 12;

/// A target leg never carries `REQ_NOWAIT`: a target that cannot take
/// it, or is busy, must not fail the migration.
///
/// On allocation failure `orig` is handed back untouched.
pub(crate) fn send(
    mig: &Migration,
    ctx_set: &BioSet,
    plain_set: &BioSet,
    orig: Bio,
    kind: Kind,
    regions: Regions,
    legs: Legs<'_>,
) -> core::result::Result<(), Bio> {
    // SAFETY: `orig` is live; `bi_bdev` is the device it was submitted to.
    let own = unsafe { BlockDevice::from_raw((*orig.raw()).bi_bdev) };
    let src = if legs.source {
        match ctx_set.clone_of(&orig, own) {
            Some(c) => Some(c),
            None => return Err(orig),
        }
    } else {
        None
    };
    let tgt = match legs.target {
        Some((dev, sector)) => {
            let set = if src.is_some() { plain_set } else { ctx_set };
            match set.clone_of(&orig, dev) {
                Some(c) => Some((c, sector)),
                None => {
                    if let Some(c) = src {
                        // SAFETY: Never submitted: ours to put.
                        unsafe { bindings::bio_put(c.as_ptr()) };
                    }
                    return Err(orig);
                }
            }
        }
        None => None,
    };
    let holder = match (src, &tgt) {
        (Some(c), _) => c,
        (None, Some((c, _))) => *c,
        (None, None) => return Err(orig),
    };
    let n = u32::from(src.is_some()) + u32::from(tgt.is_some());
    let orig = orig.into_raw();
    // SAFETY: `holder` comes from `ctx_set`, whose front pad of `CTX_PAD`
    // bytes sits right before the bio and is ours until the last leg ends.
    // `mig` outlives the context: it waits for its owned bios to finish.
    let ctx = unsafe {
        let ctx = holder
            .as_ptr()
            .cast::<u8>()
            .sub(CTX_PAD as usize)
            .cast::<Ctx>();
        ptr::write(
            ctx,
            Ctx {
                orig,
                holder: holder.as_ptr(),
                mig,
                start: regions.start,
                end: regions.end,
                pending: AtomicU32::new(n),
                status: AtomicU8::new(0),
                kind,
            },
        );
        ctx
    };
    // SAFETY: The clones are ours until submitted; `ctx` is live until
    // their last completion. The source clone keeps the original's device
    // and sector and is flagged so that no filter takes it again.
    unsafe {
        if let Some(c) = src {
            let c = c.as_ptr();
            bindings::bio_set_flag(c, bindings::BIO_FILTERED);
            (*c).bi_end_io = Some(holder_end);
            (*c).bi_private = ctx.cast::<c_void>();
        }
        if let Some((c, sector)) = tgt {
            let c = c.as_ptr();
            (*c).bi_opf &= !bindings::REQ_NOWAIT;
            (*c).bi_iter.bi_sector = sector;
            (*c).bi_end_io = Some(if src.is_some() {
                target_end
            } else {
                holder_end
            });
            (*c).bi_private = ctx.cast::<c_void>();
        }
        if let Some(c) = src {
            bindings::submit_bio_noacct(c.as_ptr());
        }
        if let Some((c, _)) = tgt {
            bindings::submit_bio_noacct(c.as_ptr());
        }
    }
    Ok(())
}

/// One leg of `ctx` has completed; the last one finishes the context.
///
/// # Safety
///
/// `ctx` must be a live context with at least one pending leg, called once
/// per leg.
unsafe fn leg_done(ctx: *mut Ctx) {
    // SAFETY: `ctx` is live until its last leg finishes it, below.
    if unsafe { (*ctx).pending.fetch_sub(1, Ordering::AcqRel) } != 1 {
        return;
    }
    // SAFETY: This was the last leg: nobody else touches `ctx` any more.
    let (orig, holder, mig, regions, status, kind) = unsafe {
        (
            (*ctx).orig,
            (*ctx).holder,
            &*(*ctx).mig,
            Regions {
                start: (*ctx).start,
                end: (*ctx).end,
            },
            (*ctx).status.load(Ordering::Acquire),
            (*ctx).kind,
        )
    };
    match kind {
        Kind::Write => mig.write_done(regions, status),
        Kind::HeadRead => mig.head_read_done(),
        Kind::Redirect => {}
    }
    // SAFETY: The holder has completed and carries `ctx` in its front pad;
    // we are done with both. `orig` is the bio the filter took.
    unsafe {
        bindings::bio_put(holder);
        (*orig).bi_status = status;
        bindings::bio_endio(orig);
    }
    // Last: after this the migration may be dropped.
    mig.bio_done();
}

/// Completion of a holder clone: the source leg, or the only (target) leg
/// of a redirected bio. Its status is the original's.
///
/// # Safety
///
/// Called by the block layer for a clone armed by [`send`].
unsafe extern "C" fn holder_end(clone: *mut bindings::bio) {
    // SAFETY: `bi_private` is the context set by `send`; the clone is live
    // (it is only put in `leg_done`).
    unsafe {
        let ctx = (*clone).bi_private.cast::<Ctx>();
        (*ctx).status.store((*clone).bi_status, Ordering::Release);
        leg_done(ctx);
    }
}

/// Completion of the target leg of a mirrored write.
///
/// # Safety
///
/// Called by the block layer for a clone armed by [`send`].
unsafe extern "C" fn target_end(clone: *mut bindings::bio) {
    // SAFETY: `bi_private` is the context set by `send`, live until its
    // last leg; the clone is ours to put.
    unsafe {
        let ctx = (*clone).bi_private.cast::<Ctx>();
        let status = (*clone).bi_status;
        if status != 0 {
            let discard = matches!(
                (*clone).bi_opf & bindings::REQ_OP_MASK,
                bindings::req_op_REQ_OP_DISCARD
                    | bindings::req_op_REQ_OP_SECURE_ERASE
                    | bindings::req_op_REQ_OP_WRITE_ZEROES
            );
            let regions = Regions {
                start: (*ctx).start,
                end: (*ctx).end,
            };
            (*(*ctx).mig).target_error(regions, status, discard);
        }
        bindings::bio_put(clone);
        leg_done(ctx);
    }
}
