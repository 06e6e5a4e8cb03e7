// SPDX-License-Identifier: GPL-2.0-only
//! blkmig protocol core: the region map, the copy protocol and the ioctl ABI.
//!
//! This crate is compiled unchanged into the `blkmig` kernel module (which
//! includes `abi.rs`, `region.rs` and `sync.rs` as modules of its own crate
//! root, so `crate::` paths resolve there too) and into `migrate`, where it
//! is model-checked with loom and property-tested. It therefore uses nothing
//! but `core`, and nothing newer than Rust 1.85 / edition 2021.
#![no_std]

pub mod abi;
pub mod region;
pub mod sync;
