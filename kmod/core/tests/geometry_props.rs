//! Properties of the sector-to-region arithmetic.
#![cfg(not(loom))]

use blkmig_core::region::Geometry;
use proptest::prelude::*;

proptest! {
    /// The regions a sector range touches are exactly those whose span
    /// intersects it, clamped to the device.
    #[test]
    fn regions_of_matches_spans(
        sectors in 1u64..1_000_000,
        shift in 12u32..=22,
        start in 0u64..1_100_000,
        len in 0u64..10_000,
    ) {
        let g = Geometry::new(sectors, shift).unwrap();
        let rs = g.regions_of(start, len);
        let (lo, hi) = (start << 9, (start + len).min(sectors) << 9);
        for r in 0..g.regions() {
            let (off, n) = g.region_span(r).unwrap();
            let touches = len > 0 && start < sectors && off < hi && lo < off + n;
            prop_assert_eq!(touches, (rs.start..rs.end).contains(&r), "region {}", r);
        }
    }

    /// Region spans tile the device exactly.
    #[test]
    fn spans_tile_the_device(sectors in 1u64..5_000_000, shift in 12u32..=30) {
        let g = Geometry::new(sectors, shift).unwrap();
        let mut next = 0;
        for r in 0..g.regions() {
            let (off, n) = g.region_span(r).unwrap();
            prop_assert_eq!(off, next);
            prop_assert!(n > 0 && n <= g.region_bytes());
            next = off + n;
        }
        prop_assert_eq!(next, sectors << 9);
    }
}
