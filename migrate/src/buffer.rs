//! The one aligned buffer type used for O_DIRECT I/O.

use aligned_vec::{ABox, AVec, RuntimeAlign};

use crate::error::Error;
use crate::units::Bytes;

/// Most bytes of region buffers one copy keeps at once; the queue depth is
/// reduced to fit.
pub const IN_FLIGHT_MAX: u64 = 256 << 20;

/// How many region buffers a copy uses, and how long each is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BufferPlan {
    /// Bytes a buffer: the region size, or the device's if it is smaller.
    pub len: usize,
    /// Buffers in flight (the effective queue depth).
    pub depth: usize,
}

/// Sizes the buffers of a copy of `regions` regions of `region` bytes over
/// a device of `device` bytes with `depth` in flight: no buffer is longer
/// than the device, no more buffers than regions, and all of them within
/// [`IN_FLIGHT_MAX`] and half of `available` memory (MemAvailable, when
/// known). Refuses a region that does not fit even alone.
pub fn plan(
    region: u64,
    device: u64,
    regions: u64,
    depth: usize,
    available: Option<u64>,
) -> Result<BufferPlan, Error> {
    let len = region.min(device).max(1);
    let mut budget = IN_FLIGHT_MAX;
    if let Some(avail) = available {
        if len > avail / 2 {
            return Err(Error::Memory {
                region: Bytes(len),
                available: Bytes(avail),
            });
        }
        budget = budget.min(avail / 2);
    }
    let fit = usize::try_from(budget / len).unwrap_or(usize::MAX).max(1);
    let by_regions = usize::try_from(regions).unwrap_or(usize::MAX).max(1);
    let eff = depth.max(1).min(by_regions);
    let plan = BufferPlan {
        len: usize::try_from(len).unwrap_or(usize::MAX),
        depth: eff.min(fit),
    };
    if plan.depth < eff {
        tracing::info!(
            "queue depth reduced from {eff} to {}: {} regions of {} in flight would use more than {} of memory",
            plan.depth,
            eff,
            Bytes(len),
            Bytes(budget)
        );
    }
    Ok(plan)
}

/// MemAvailable from /proc/meminfo, in bytes.
pub fn mem_available() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// A zero-initialised byte buffer whose start is aligned to the alignment a
/// device asks for (its logical block size or the file's direct-I/O memory
/// alignment), as O_DIRECT requires.
pub struct AlignedBuf {
    inner: ABox<[u8], RuntimeAlign>,
    align: usize,
}

impl AlignedBuf {
    /// A buffer of `len` zero bytes aligned to `align` (a power of two).
    ///
    /// # Panics
    /// If `align` is not a power of two (a programming error: device
    /// alignments are checked when the device is opened).
    pub fn new(align: usize, len: usize) -> Self {
        assert!(
            align.is_power_of_two(),
            "alignment {align} is not a power of two"
        );
        let mut v = AVec::<u8, RuntimeAlign>::new(align);
        v.resize(len, 0);
        Self {
            inner: v.into_boxed_slice(),
            align,
        }
    }

    /// The alignment the buffer was made with.
    pub fn alignment(&self) -> usize {
        self.align
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.inner.len()
    }

    /// Whether the buffer is empty.
    pub fn is_empty(&self) -> bool {
        self.inner.is_empty()
    }

    /// Whether every byte of `buf[..len]` is zero.
    pub fn is_zero(&self, len: usize) -> bool {
        let mut words = self.inner[..len].chunks_exact(8);
        words
            .by_ref()
            .all(|w| u64::from_ne_bytes(w.try_into().unwrap_or([1; 8])) == 0)
            && words.remainder().iter().all(|&b| b == 0)
    }
}

impl std::ops::Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.inner
    }
}

impl std::ops::DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.inner
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_and_zeroed() {
        for align in [512usize, 4096, 65536] {
            let b = AlignedBuf::new(align, 3 * align);
            assert_eq!(b.as_ptr() as usize % align, 0, "align {align}");
            assert_eq!(b.alignment(), align);
            assert_eq!(b.len(), 3 * align);
            assert!(b.iter().all(|&x| x == 0));
        }
    }

    #[test]
    fn zero_detection_sees_every_byte() {
        let mut b = AlignedBuf::new(512, 1029);
        assert!(b.is_zero(1029));
        for i in [0usize, 7, 8, 511, 1023, 1024, 1028] {
            b[i] = 1;
            assert!(!b.is_zero(1029), "byte {i}");
            assert!(b.is_zero(i), "prefix before byte {i}");
            b[i] = 0;
        }
    }

    #[test]
    fn buffers_fit_the_device_and_the_memory_budget() {
        // A 1 GiB region over a 64 MiB image: one buffer, of 64 MiB.
        let p = plan(1 << 30, 64 << 20, 1, 8, None).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            p,
            BufferPlan {
                len: 64 << 20,
                depth: 1
            }
        );
        // 64 MiB regions, 16 of them, depth 8: 4 fit in 256 MiB.
        let p = plan(64 << 20, 1 << 30, 16, 8, None).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(p.depth, 4);
        // Little memory available: fewer still.
        let p = plan(64 << 20, 1 << 30, 16, 8, Some(256 << 20)).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(p.depth, 2);
        // Not even one region fits.
        assert!(plan(1 << 30, 4 << 30, 4, 8, Some(1 << 30)).is_err());
        // Small regions keep the depth asked for.
        let p = plan(1 << 20, 1 << 30, 1024, 8, Some(1 << 34)).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            p,
            BufferPlan {
                len: 1 << 20,
                depth: 8
            }
        );
    }

    #[test]
    #[should_panic(expected = "not a power of two")]
    fn rejects_bad_alignment() {
        let _ = AlignedBuf::new(1000, 4096);
    }
}
