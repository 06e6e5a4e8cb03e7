//! What the copier needs from the kernel filter, as a trait: the kernel's
//! ioctls implement it ([`crate::filter::Filtered`]), and so does the
//! in-process simulation the tests drive on image files.

use blkmig_core::abi::{RegionOp, Status};

/// A filter request failed; `errno` says why.
#[derive(Debug, thiserror::Error)]
#[error("{what} ({name})", name = crate::filter::errno_name(.errno))]
pub struct TrackerError {
    /// What failed, in words.
    pub what: String,
    /// Positive errno.
    pub errno: i32,
}

impl From<crate::filter::FilterError> for TrackerError {
    fn from(e: crate::filter::FilterError) -> Self {
        Self {
            what: format!("{}: {}", e.what, e.meaning),
            errno: e.errno,
        }
    }
}

/// The region tracking and switch operations of a blkmig filter.
pub trait Tracker: Send + Sync {
    /// The filter's status.
    fn status(&self) -> Result<Status, TrackerError>;
    /// COPY_BEGIN for each op (fills `word` and `result`).
    fn copy_begin(&self, ops: &mut [RegionOp]) -> Result<(), TrackerError>;
    /// COPY_END for each op (fills `result`).
    fn copy_end(&self, ops: &mut [RegionOp]) -> Result<(), TrackerError>;
    /// VERIFY_BEGIN for each op (fills `word` and `result`).
    fn verify_begin(&self, ops: &mut [RegionOp]) -> Result<(), TrackerError>;
    /// VERIFY_END for each op (fills `result`: `REGION_OK` if the
    /// comparison holds).
    fn verify_end(&self, ops: &mut [RegionOp]) -> Result<(), TrackerError>;
    /// Clears SYNCED on each op's region (it is copied again).
    fn unsync(&self, ops: &mut [RegionOp]) -> Result<(), TrackerError>;
    /// SYNCED bits of regions `first..first + count` (one bool each).
    fn synced(&self, first: u64, count: u64) -> Result<Vec<bool>, TrackerError>;
    /// Hold new writes and wait until writes in flight have drained. The
    /// filter releases them by itself after `timeout_ms`.
    fn hold_writes(&self, timeout_ms: u32) -> Result<(), TrackerError>;
    /// Switch to REDIRECT (every region must be synced, writes held).
    fn switch(&self) -> Result<(), TrackerError>;
    /// Release held writes and cancel the switch.
    fn release(&self) -> Result<(), TrackerError>;
}
