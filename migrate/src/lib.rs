//! blkmig userspace: devices, the pipelined copier, progress, and the
//! kernel filter's ioctls. The `migrate` binary is a thin front end.

pub mod buffer;
pub mod copy;
pub mod device;
pub mod error;
pub mod filter;
pub mod fsmap;
pub mod jsondoc;
pub mod list;
pub mod live;
pub mod migration;
pub mod output;
pub mod progress;
pub mod rebalance;
pub mod recover;
pub mod tracker;
pub mod units;
pub mod verify;

pub use blkmig_core as core;
