// SPDX-License-Identifier: GPL-2.0-only
//! Bio plumbing of the filter: bio sets, the per-bio context that travels
//! in a clone's front pad, and the completion callbacks.
//!
//! Every bio the filter takes is completed by [`finish`] once all the
//! clones it sent out (one to the source, maybe one to the target, or one
//! to the target alone in REDIRECT) have completed. The context lives in
//! the front pad of the first clone (its "holder"), allocated from a bio
//! set with `GFP_NOIO`: the allocation is backed by a mempool and cannot
//! fail or recurse into the filtered device.

use core::{
    ffi::c_void,
    mem::size_of,
    ptr,
    sync::atomic::{AtomicU32, AtomicU8, Ordering},
};

use kernel::{bindings, error::to_result, prelude::*, types::Opaque};

use crate::{migration::Migration, region::Regions};

/// A `struct bio_set`, exited on drop.
#[pin_data(PinnedDrop)]
pub(crate) struct BioSet {
    #[pin]
    inner: Opaque<bindings::bio_set>,
}

impl BioSet {
    /// A bio set of `pool` reserved bios with `front_pad` bytes before each.
    pub(crate) fn new(pool: u32, front_pad: u32) -> impl PinInit<Self, Error> {
        let init = move |slot: *mut Self| {
            // SAFETY: `slot` is valid, pinned memory for a `BioSet`
            // (guaranteed by the caller of the initializer); `raw_get`
            // creates no reference to the uninitialised memory.
            let set = unsafe { Opaque::raw_get(ptr::addr_of!((*slot).inner)) };
            // SAFETY: `set` is valid for a `bio_set`. `bioset_init` expects
            // zeroed memory (it leaves the fields of unused features, such
            // as the per-cpu cache, as it finds them), then initialises it
            // or fails leaving nothing to undo.
            to_result(unsafe {
                ptr::write_bytes(set, 0, 1);
                bindings::bioset_init(set, pool, front_pad, bindings::BIOSET_NEED_RESCUER as i32)
            })
        };
        // SAFETY: On success `init` has initialised the only field; on
        // error nothing needs dropping.
        unsafe { kernel::init::pin_init_from_closure(init) }
    }

    pub(crate) fn as_ptr(&self) -> *mut bindings::bio_set {
        self.inner.get()
    }
}

#[pinned_drop]
impl PinnedDrop for BioSet {
    fn drop(self: Pin<&mut Self>) {
        // SAFETY: The set was initialised by `new` (a `BioSet` only exists
        // after that succeeded), and every bio allocated from it has been
        // freed: the owner drains its bios before dropping the set.
        unsafe { bindings::bioset_exit(self.inner.get()) };
    }
}

/// What a context is for.
#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Kind {
    /// A write in CLONE mode: complete the regions when done.
    Write,
    /// A bio redirected to the target.
    Redirect,
    /// A read of the first region sent to the source, tracked for the switch.
    HeadRead,
}

/// State of one bio the filter took, in the front pad of its holder clone.
#[repr(C)]
pub(crate) struct Ctx {
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

/// # Safety
///
/// `holder` must be a bio allocated from a bio set with [`CTX_PAD`] bytes of
/// front pad.
unsafe fn ctx_of(holder: *mut bindings::bio) -> *mut Ctx {
    // SAFETY: The bio set places the bio `CTX_PAD` bytes after the start
    // of its allocation (caller's guarantee).
    unsafe { holder.cast::<u8>().sub(CTX_PAD as usize).cast::<Ctx>() }
}

/// Clones `orig` for `bdev` from `set`. Returns null only if the allocation
/// failed (it cannot with `GFP_NOIO` and a mempool, but it is checked).
///
/// # Safety
///
/// `orig` must be a live bio owned by the caller, `bdev` a live block
/// device, `set` an initialised bio set.
pub(crate) unsafe fn clone(
    orig: *mut bindings::bio,
    bdev: *mut bindings::block_device,
    set: &BioSet,
) -> *mut bindings::bio {
    // SAFETY: Guaranteed by the caller.
    unsafe { bindings::bio_alloc_clone(bdev, orig, bindings::GFP_NOIO, set.as_ptr()) }
}

/// Sets up the context of `holder` (a clone from the context bio set) for
/// `orig`, with `legs` clones to wait for.
///
/// # Safety
///
/// `holder` must come from a bio set with [`CTX_PAD`] front pad and not be
/// submitted yet; `mig` must stay valid until the context finishes (the
/// migration waits for its `owned` count to drop to zero before it goes).
pub(crate) unsafe fn init_ctx(
    holder: *mut bindings::bio,
    orig: *mut bindings::bio,
    mig: &Migration,
    kind: Kind,
    regions: Regions,
    legs: u32,
) -> *mut Ctx {
    // SAFETY: See the function's requirements.
    let ctx = unsafe { ctx_of(holder) };
    // SAFETY: `ctx` points at the front pad, valid for a `Ctx` and not in
    // use by anyone else yet.
    unsafe {
        ptr::write(
            ctx,
            Ctx {
                orig,
                holder,
                mig,
                start: regions.start,
                end: regions.end,
                pending: AtomicU32::new(legs),
                status: AtomicU8::new(0),
                kind,
            },
        )
    };
    ctx
}

/// Points `clone` at `sector` and at the completion `end` with `ctx`.
///
/// # Safety
///
/// `clone` must be a clone not yet submitted, `ctx` a live context.
pub(crate) unsafe fn arm(
    clone: *mut bindings::bio,
    sector: u64,
    end: unsafe extern "C" fn(*mut bindings::bio),
    ctx: *mut Ctx,
) {
    // SAFETY: The clone is ours until it is submitted.
    unsafe {
        (*clone).bi_iter.bi_sector = sector;
        (*clone).bi_end_io = Some(end);
        (*clone).bi_private = ctx.cast::<c_void>();
    }
}

/// Submits a clone.
///
/// # Safety
///
/// `clone` must be an armed clone, not yet submitted.
pub(crate) unsafe fn submit(clone: *mut bindings::bio) {
    // SAFETY: Guaranteed by the caller. From the filter hook the bio is
    // queued on `current->bio_list` and dispatched after the hook returns.
    unsafe { bindings::submit_bio_noacct(clone) };
}

/// Marks `bio` so that no filter sees it again.
///
/// # Safety
///
/// `bio` must be a live bio owned by the caller.
pub(crate) unsafe fn set_filtered(bio: *mut bindings::bio) {
    // SAFETY: Guaranteed by the caller.
    unsafe { bindings::bio_set_flag(bio, bindings::BIO_FILTERED) };
}

/// Completes `bio` with `status`.
///
/// # Safety
///
/// `bio` must be a live bio the caller owns and may complete.
pub(crate) unsafe fn complete(bio: *mut bindings::bio, status: u8) {
    // SAFETY: Guaranteed by the caller.
    unsafe {
        (*bio).bi_status = status;
        bindings::bio_endio(bio);
    }
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
        Kind::Write => mig.write_done(regions),
        Kind::HeadRead => mig.head_read_done(),
        Kind::Redirect => {}
    }
    // SAFETY: The holder clone has completed and carries `ctx` in its front
    // pad; we are done with both. `orig` is the bio the filter took: it
    // completes now, with the source's status (or the target's, redirected).
    unsafe {
        bindings::bio_put(holder);
        complete(orig, status);
    }
    // Last: after this the migration may be dropped.
    mig.bio_done();
}

/// Completion of the source leg of a write (the holder clone).
///
/// # Safety
///
/// Called by the block layer for a clone armed with this callback.
pub(crate) unsafe extern "C" fn source_end(clone: *mut bindings::bio) {
    // SAFETY: `bi_private` is the context set by `arm`; the clone is live
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
/// Called by the block layer for a clone armed with this callback.
pub(crate) unsafe extern "C" fn target_end(clone: *mut bindings::bio) {
    // SAFETY: `bi_private` is the context set by `arm`, live until its last
    // leg; the clone is ours to put.
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

/// Completion of a redirected bio's clone (the holder, alone).
///
/// # Safety
///
/// Called by the block layer for a clone armed with this callback.
pub(crate) unsafe extern "C" fn redirect_end(clone: *mut bindings::bio) {
    // SAFETY: As in `source_end`.
    unsafe {
        let ctx = (*clone).bi_private.cast::<Ctx>();
        (*ctx).status.store((*clone).bi_status, Ordering::Release);
        leg_done(ctx);
    }
}
