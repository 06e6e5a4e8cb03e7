//! The one aligned buffer type used for O_DIRECT I/O.

use aligned_vec::{ABox, AVec, RuntimeAlign};

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
    #[should_panic(expected = "not a power of two")]
    fn rejects_bad_alignment() {
        let _ = AlignedBuf::new(1000, 4096);
    }
}
