//! What the copier needs from the kernel filter, as a trait: the kernel's
//! ioctls implement it ([`crate::filter::Filtered`]), and so does the
//! in-process simulation the tests drive on image files.

use blkmig_core::abi::{RegionOp, Status};

use crate::filter::FilterError;

/// The region tracking and switch operations of a blkmig filter.
pub trait Tracker: Send + Sync {
    /// The filter's status.
    fn status(&self) -> Result<Status, FilterError>;
    /// COPY_BEGIN for each op (fills `word` and `result`).
    fn copy_begin(&self, ops: &mut [RegionOp]) -> Result<(), FilterError>;
    /// COPY_END for each op (fills `result`).
    fn copy_end(&self, ops: &mut [RegionOp]) -> Result<(), FilterError>;
    /// VERIFY_BEGIN for each op (fills `word` and `result`).
    fn verify_begin(&self, ops: &mut [RegionOp]) -> Result<(), FilterError>;
    /// VERIFY_END for each op (fills `result`: `REGION_OK` if the
    /// comparison holds).
    fn verify_end(&self, ops: &mut [RegionOp]) -> Result<(), FilterError>;
    /// Clears SYNCED on each op's region (it is copied again).
    fn unsync(&self, ops: &mut [RegionOp]) -> Result<(), FilterError>;
    /// SYNCED bits of regions `first..first + count` (one bool each).
    fn synced(&self, first: u64, count: u64) -> Result<Vec<bool>, FilterError>;
    /// Hold new writes and wait until writes in flight have drained. The
    /// filter releases them by itself after `timeout_ms`.
    fn hold_writes(&self, timeout_ms: u32) -> Result<(), FilterError>;
    /// Switch to REDIRECT (every region must be synced, writes held).
    /// `head_writes` is the `Status::head_writes` seen when the head was
    /// read and saved: `EAGAIN`, still holding, if a write reached the head
    /// since.
    fn switch(&self, head_writes: u64) -> Result<(), FilterError>;
    /// Release held writes and cancel the switch.
    fn release(&self) -> Result<(), FilterError>;
}
