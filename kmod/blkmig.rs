// SPDX-License-Identifier: GPL-2.0-only
//! blkmig: live migration of a block device to another one.
//!
//! Registers the block device filter "blkmig". User space (`migrate`)
//! attaches it to a live source device with `BLKFILTER_ATTACH`, naming the
//! target; see `docs/kernel.md`.

// `try_pin_init!` over the migration's many fields nests deeper than the
// default limit.
#![recursion_limit = "512"]

use kernel::prelude::*;

// The protocol core, shared unchanged with the userspace crate. It refers
// to itself as `crate::abi` / `crate::sync`, so it must sit at the root.
#[expect(
    dead_code,
    unreachable_pub,
    reason = "shared with user space: the ioctl numbers and some payloads serve it only"
)]
#[path = "core/src/abi.rs"]
mod abi;
#[expect(
    dead_code,
    unreachable_pub,
    reason = "shared with user space; the copy protocol is wired in with CLONE"
)]
#[path = "core/src/region.rs"]
mod region;
#[expect(unreachable_pub, reason = "shared with user space")]
#[path = "core/src/sync.rs"]
mod sync;

mod bdev;
mod bio;
mod filter;
mod migration;
mod sys;
mod wait;

/// The module's version in its `.modinfo` (what `MODULE_VERSION()` writes
/// in C): `abi<N>`, the control ABI it speaks, which the kernel shows in
/// `/sys/module/blkmig/version`. User space reads it there to refuse an
/// attach to a module of another ABI with a clear message, and to warn,
/// without a filter to ask.
#[cfg(MODULE)]
#[link_section = ".modinfo"]
#[used(compiler)]
static MODINFO_VERSION: [u8; 24] = modinfo_version(abi::ABI_VERSION);

/// `version=abi<N>` and NUL bytes (the kernel skips the padding between
/// `.modinfo` strings).
#[cfg(MODULE)]
const fn modinfo_version(abi: u32) -> [u8; 24] {
    const PREFIX: &[u8] = b"version=abi";
    let mut out = [0u8; 24];
    let mut i = 0;
    while i < PREFIX.len() {
        out[i] = PREFIX[i];
        i += 1;
    }
    // The digits, most significant first: at most 10 for a `u32`, and the
    // prefix's 11 bytes and a NUL leave room for them.
    let mut digits = [0u8; 10];
    let mut n = abi;
    let mut d = 0;
    loop {
        digits[d] = b'0' + (n % 10) as u8;
        d += 1;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    while d > 0 {
        d -= 1;
        out[i] = digits[d];
        i += 1;
    }
    out
}

module! {
    type: BlkMig,
    name: "blkmig",
    author: "blkmig developers",
    description: "Live block device migration (block device filter)",
    license: "GPL",
    alias: ["blkfilter-blkmig"],
}

/// The module: owns the filter registration.
struct BlkMig {
    _registration: Pin<KBox<filter::Registration<migration::Migration>>>,
}

impl kernel::Module for BlkMig {
    fn init(module: &'static ThisModule) -> Result<Self> {
        // 6.12 has no `InPlaceModule`: the pinned registration lives in its
        // own allocation, held by the module object.
        let registration = KBox::pin_init(filter::Registration::new(module), GFP_KERNEL)?;
        pr_info!("filter \"blkmig\" registered\n");
        Ok(Self {
            _registration: registration,
        })
    }
}
