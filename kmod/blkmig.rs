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
