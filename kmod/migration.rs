// SPDX-License-Identifier: GPL-2.0-only
//! The `blkmig` filter: one migration of a source device to a target.
//!
//! This round the filter passes every bio through; the structure is the
//! one CLONE and REDIRECT fill in: `submit_bio` classifies the bio and the
//! region map tracks writes per region.

use core::mem::{offset_of, size_of};

use kernel::{alloc::flags, bindings, c_str, prelude::*, types::AsBytes, uaccess::UserSlice};

use crate::{
    abi::{self, AttachOptions, CtlCmd, Mode, Status},
    bdev::{Bio, BlockDevice, DevT, Op, OpenDevice},
    filter::{Filter, Holder},
    region::{Geometry, RegionMap},
    sync::{AtomicU64, Ordering},
};

// SAFETY: `Status` is `#[repr(C)]`, made of integers only, and has no
// padding (its layout is asserted in `abi.rs`), so every byte is
// initialised.
unsafe impl AsBytes for Status {}

/// The parsed and checked attach options.
struct Options {
    region_shift: u32,
    target: DevT,
    hold_timeout_ms: u32,
}

impl Options {
    /// Parses `opt` as an [`AttachOptions`].
    fn parse(opt: &[u8]) -> Result<Self> {
        if opt.len() != size_of::<AttachOptions>() {
            return Err(EINVAL);
        }
        // Field by field, at the offsets `abi.rs` asserts: no unsafe
        // reinterpretation of user-controlled bytes.
        let field = |off: usize| -> u32 {
            let mut b = [0u8; 4];
            b.copy_from_slice(&opt[off..off + 4]);
            u32::from_ne_bytes(b)
        };
        let o = AttachOptions {
            version: field(offset_of!(AttachOptions, version)),
            region_shift: field(offset_of!(AttachOptions, region_shift)),
            target_major: field(offset_of!(AttachOptions, target_major)),
            target_minor: field(offset_of!(AttachOptions, target_minor)),
            hold_timeout_ms: field(offset_of!(AttachOptions, hold_timeout_ms)),
            flags: field(offset_of!(AttachOptions, flags)),
        };
        if o.version != abi::ABI_VERSION
            || o.flags != 0
            || !(abi::REGION_SHIFT_MIN..=abi::REGION_SHIFT_MAX).contains(&o.region_shift)
            || o.hold_timeout_ms > abi::HOLD_TIMEOUT_MS_MAX
        {
            return Err(EINVAL);
        }
        Ok(Self {
            region_shift: o.region_shift,
            target: DevT::new(o.target_major, o.target_minor).ok_or(EINVAL)?,
            hold_timeout_ms: match o.hold_timeout_ms {
                0 => abi::HOLD_TIMEOUT_MS_DEFAULT,
                ms => ms,
            },
        })
    }
}

/// Allocates `n` zeroed region words (`kvmalloc`).
fn alloc_words(n: u64) -> Result<KVVec<AtomicU64>> {
    let n = usize::try_from(n).map_err(|_| ENOMEM)?;
    let mut words = KVVec::with_capacity(n, flags::GFP_KERNEL)?;
    for _ in 0..n {
        // Cannot allocate: the capacity is reserved above.
        words.push(AtomicU64::new(0), flags::GFP_KERNEL)?;
    }
    Ok(words)
}

/// One attached migration.
pub(crate) struct Migration {
    geometry: Geometry,
    words: KVVec<AtomicU64>,
    target: OpenDevice,
    /// Write bios (with data, or discards) seen; statistics only.
    writes_seen: AtomicU64,
    #[expect(dead_code, reason = "used by the switch (HOLD_WRITES)")]
    hold_timeout_ms: u32,
}

impl Migration {
    fn map(&self) -> RegionMap<'_> {
        RegionMap::new(&self.words)
    }

    /// The reply to [`CtlCmd::Status`].
    fn status(&self) -> Status {
        let target = self.target.bdev();
        let dev = target.dev();
        Status {
            version: abi::ABI_VERSION,
            mode: Mode::Clone as u32,
            region_shift: self.geometry.shift(),
            source_sectors: self.geometry.sectors(),
            target_sectors: target.nr_sectors(),
            regions_total: self.geometry.regions(),
            regions_synced: self.map().synced_count(),
            writes_seen: self.writes_seen.load(Ordering::Relaxed),
            failure: abi::Failure::None as u32,
            target_major: dev.major(),
            target_minor: dev.minor(),
            ..Status::default()
        }
    }
}

impl Filter for Migration {
    const NAME: &'static CStr = c_str!("blkmig");

    fn attach(source: &BlockDevice, opt: &[u8], holder: Holder) -> Result<Pin<KBox<Self>>> {
        let opts = Options::parse(opt)?;
        if opts.target == source.dev() {
            return Err(EINVAL);
        }
        let target = OpenDevice::open_exclusive(opts.target, holder)?;
        let t = target.bdev();
        if t.overlaps(source) {
            return Err(EINVAL);
        }
        let sectors = source.nr_sectors();
        if t.nr_sectors() < sectors {
            return Err(ENOSPC);
        }
        let region_bytes = 1u64 << opts.region_shift;
        for lbs in [source.logical_block_size(), t.logical_block_size()] {
            if lbs == 0 || region_bytes % u64::from(lbs) != 0 {
                return Err(EINVAL);
            }
        }
        let geometry = Geometry::new(sectors, opts.region_shift).map_err(|_| EINVAL)?;
        // GFP_KERNEL is fine: attach runs from the ioctl, outside any
        // filtered bio, with the source queue not frozen.
        let words = alloc_words(geometry.regions())?;
        let m = KBox::pin(
            Self {
                geometry,
                words,
                target,
                writes_seen: AtomicU64::new(0),
                hold_timeout_ms: opts.hold_timeout_ms,
            },
            flags::GFP_KERNEL,
        )?;
        pr_info!(
            "attached to {}:{}, target {}:{}, {} regions of {} KiB\n",
            source.dev().major(),
            source.dev().minor(),
            opts.target.major(),
            opts.target.minor(),
            geometry.regions(),
            region_bytes >> 10
        );
        Ok(m)
    }

    fn ctl(&self, cmd: u32, buf: UserSlice, len: &mut u32) -> Result {
        match CtlCmd::from_raw(cmd) {
            Some(CtlCmd::Status) => {
                if (*len as usize) < size_of::<Status>() {
                    return Err(EINVAL);
                }
                buf.writer().write(&self.status())?;
                *len = size_of::<Status>() as u32;
                Ok(())
            }
            Some(_) => Err(Error::from_errno(-(bindings::EOPNOTSUPP as i32))),
            None => Err(EINVAL),
        }
    }

    fn submit_bio(&self, source: &BlockDevice, bio: &Bio) -> bool {
        match bio.op() {
            // Reads never need coordination; other operations (zone
            // management) are passed to the source untouched.
            Op::Read | Op::Other => false,
            Op::Write | Op::Discard | Op::WriteZeroes => {
                // CLONE hooks in here: account the touched regions with
                // `RegionMap::write_submit` and mirror when one is SYNCED.
                // This round the write is only counted and passes through.
                let regions = self
                    .geometry
                    .regions_of(bio.sector_in(source), bio.nr_sectors());
                if !regions.is_empty() {
                    self.writes_seen.fetch_add(1, Ordering::Relaxed);
                }
                false
            }
        }
    }
}

impl Drop for Migration {
    fn drop(&mut self) {
        // Nothing is in flight yet: the filter neither takes nor submits
        // bios. `target` closes the device, `words` frees the map.
        pr_info!("detached\n");
    }
}
