// SPDX-License-Identifier: GPL-2.0-only
//! Atomics used by the protocol core.
//!
//! Everything that touches shared memory goes through this shim so that the
//! loom model checker can substitute its own atomics (`--cfg loom`). The
//! kernel module and the normal userspace build use `core::sync::atomic`.

#[cfg(loom)]
pub use loom::sync::atomic::{AtomicU64, Ordering};

#[cfg(not(loom))]
pub use core::sync::atomic::{AtomicU64, Ordering};
