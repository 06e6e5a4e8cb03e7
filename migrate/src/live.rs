//! The live-migration commands' policy: attach after every check, resume a
//! migration that is already attached (if it is ours and still cloning),
//! abandon and detach on an interruption, refuse an abort after the switch.
//! The `migrate` binary parses options and renders what these return.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use blkmig_core::abi::{self, AttachOptions, Mode, Status};

use crate::copy;
use crate::device::{Access, DevId, Device, Kind, Probe};
use crate::error::{Error, Refusal};
use crate::filter::{FilterError, Filtered};
use crate::migration::{self, MigrateError, MigrateOptions, Migration, Summary};
use crate::progress::Progress;
use crate::tracker::Tracker;
use crate::units::Bytes;

/// What to attach.
#[derive(Clone, Debug)]
pub struct AttachRequest {
    /// The live source block device.
    pub source: PathBuf,
    /// The target block device.
    pub target: PathBuf,
    /// Region size.
    pub region_size: Bytes,
    /// How long the filter may hold writes for one switch attempt, in ms.
    pub hold_timeout_ms: u32,
}

/// An attachment made.
#[derive(Clone, Debug)]
pub struct Attached {
    /// The target, probed.
    pub target: Probe,
    /// Regions of the migration.
    pub regions: u64,
    /// Bytes a region.
    pub region_bytes: u64,
}

/// Probes both paths and refuses, before anything is opened for writing,
/// the same device twice, overlapping partitions, and mounted devices.
pub fn probe_pair(source: &Path, target: &Path) -> Result<(Probe, Probe), Error> {
    let s = Probe::new(source)?;
    let t = Probe::new(target)?;
    s.check_distinct(&t)?;
    Ok((s, t))
}

/// Checks source and target for a live migration and attaches blkmig.
pub fn attach(req: &AttachRequest) -> Result<Attached, MigrateError> {
    let (sp, tp) = probe_pair(&req.source, &req.target)?;
    for p in [&sp, &tp] {
        if p.kind != Kind::Block {
            return Err(Error::refused(&p.path, Refusal::NotBlock).into());
        }
    }
    let f = Filtered::open(&req.source)?;
    // A source that is already being migrated: say so before anything else
    // (its target is, rightly, busy).
    if let Ok(st) = f.status() {
        return Err(MigrateError::Filter(FilterError::AlreadyAttached {
            path: req.source.clone(),
            mode: migration::mode_name(st.mode),
            major: st.target_major,
            minor: st.target_minor,
        }));
    }
    // Neither may be zoned; the source must be request-based; the target
    // must be unused: blkmig will own it. The source is live.
    sp.check_not_zoned()?;
    tp.check_not_zoned()?;
    tp.check_unused()?;
    sp.check_request_based()?;
    let shared = Access {
        write: false,
        direct: false,
        exclusive: false,
    };
    let src = Device::open(&sp, shared)?;
    let tgt = Device::open(
        &tp,
        Access {
            exclusive: true,
            ..shared
        },
    )?;
    copy::check_target_size(&src, &tgt)?;
    copy::check_block_sizes(&src, &tgt)?;
    let geo = copy::geometry(&src, &tgt, req.region_size)?;
    copy::check_region_count(&src, &geo)?;
    drop(tgt);
    f.attach(
        &tp,
        AttachOptions {
            version: abi::ABI_VERSION,
            region_shift: geo.shift(),
            hold_timeout_ms: req.hold_timeout_ms,
            ..Default::default()
        },
    )
    .map_err(MigrateError::Filter)?;
    Ok(Attached {
        target: tp,
        regions: geo.regions(),
        region_bytes: geo.region_bytes(),
    })
}

/// How `start` begins.
#[derive(Clone, Debug)]
pub enum Begin {
    /// blkmig was attached now.
    Attached(Attached),
    /// A migration to this target was attached already: it resumes.
    Resumed {
        /// Regions in sync.
        synced: u64,
        /// Regions in all.
        total: u64,
    },
}

/// What `start` found.
pub enum Start {
    /// The source has switched to this target already: nothing to do.
    AlreadySwitched,
    /// Ready to copy.
    Ready(Box<Ready>),
}

/// A migration attached and ready to run.
pub struct Ready {
    /// How it began.
    pub begin: Begin,
    source: PathBuf,
    state_dir: PathBuf,
    source_id: DevId,
    filter: Arc<Filtered>,
    src: Arc<Device>,
    tgt: Arc<Device>,
    status: Status,
}

/// Starts (attaching) or resumes the migration of `req.source` to
/// `req.target`. Refuses a source being migrated elsewhere, a failed
/// migration, and a state directory on either device. A new attachment is
/// recorded in the state directory ([`crate::recover::MigrationRecord`]).
pub fn start(req: &AttachRequest, state_dir: &Path) -> Result<Start, MigrateError> {
    for p in [&req.source, &req.target] {
        crate::recover::check_state_dir(state_dir, &Probe::new(p)?)?;
    }
    let f = Filtered::open(&req.source)?;
    let begin = match f.status() {
        Ok(st) => {
            let tp = Probe::new(&req.target)?;
            let ours = matches!(tp.id, DevId::Block { major, minor }
                if (major, minor) == (st.target_major, st.target_minor));
            if !ours {
                return Err(MigrateError::OtherTarget {
                    source_path: req.source.clone(),
                    target: req.target.clone(),
                    major: st.target_major,
                    minor: st.target_minor,
                });
            }
            match Mode::from_raw(st.mode) {
                Some(Mode::Redirect) => return Ok(Start::AlreadySwitched),
                Some(Mode::Failed) => {
                    return Err(MigrateError::Failed(migration::failure_text(&st)))
                }
                _ => Begin::Resumed {
                    synced: st.regions_synced,
                    total: st.regions_total,
                },
            }
        }
        Err(FilterError::Refused {
            errno: libc::ENOENT,
            ..
        }) => Begin::Attached(attach(req)?),
        Err(e) => return Err(MigrateError::Filter(e)),
    };
    let direct = |write| Access {
        write,
        direct: true,
        exclusive: false,
    };
    let sp = Probe::new(&req.source)?;
    let tp = Probe::new(&req.target)?;
    let src = Arc::new(Device::open(&sp, direct(false))?);
    let tgt = Arc::new(Device::open(&tp, direct(true))?);
    let status = f.status()?;
    if matches!(begin, Begin::Attached(_)) {
        let rec = crate::recover::MigrationRecord {
            migration_id: status.migration_id,
            source: req.source.clone(),
            target: req.target.clone(),
            target_dev: format!("{}:{}", status.target_major, status.target_minor),
            region_bytes: 1 << status.region_shift,
            started_at: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        };
        if let Err(e) = crate::recover::record_start(state_dir, sp.id, &rec) {
            tracing::warn!(error = %e, dir = %state_dir.display(),
                "cannot record the migration in the state directory");
        }
    }
    Ok(Start::Ready(Box::new(Ready {
        begin,
        source: req.source.clone(),
        state_dir: state_dir.to_owned(),
        source_id: sp.id,
        filter: Arc::new(f),
        src,
        tgt,
        status,
    })))
}

impl Ready {
    /// Bytes of the source.
    pub fn bytes(&self) -> u64 {
        self.status.source_sectors << 9
    }

    /// Regions in all.
    pub fn regions(&self) -> u64 {
        self.status.regions_total
    }

    /// Runs the migration. Interrupted (`cancel`), it is abandoned: blkmig
    /// is detached and the source is left as it was.
    pub async fn run(
        self,
        opts: MigrateOptions,
        progress: Arc<Progress>,
        cancel: Arc<AtomicBool>,
    ) -> Result<Summary, MigrateError> {
        let tracker: Arc<dyn Tracker> = self.filter.clone();
        let m = Migration::new(
            tracker,
            self.src,
            self.tgt,
            &self.status,
            opts,
            progress,
            cancel,
        )?;
        match m.run().await {
            Err(e) if e.is_interrupted() => {
                self.filter.detach()?;
                crate::recover::record_abandoned(&self.state_dir, self.source_id);
                Err(MigrateError::Abandoned {
                    source_path: self.source,
                })
            }
            Err(MigrateError::Device(cause)) => {
                let attached = self
                    .filter
                    .status()
                    .is_ok_and(|st| Mode::from_raw(st.mode) == Some(Mode::Clone));
                Err(MigrateError::Stopped {
                    source_path: self.source,
                    attached,
                    cause,
                })
            }
            res => res,
        }
    }
}

/// Abandons the migration of `source` (before the switch): detaches blkmig.
pub fn abort(source: &Path) -> Result<(), MigrateError> {
    let f = Filtered::open(source)?;
    let st = f.status().map_err(MigrateError::Filter)?;
    if Mode::from_raw(st.mode) == Some(Mode::Redirect) {
        return Err(MigrateError::AlreadySwitched {
            source_path: source.to_owned(),
        });
    }
    f.detach().map_err(MigrateError::Filter)
}

/// Detaches blkmig from `source` (after the switch, once it is unmounted;
/// before it, this abandons the migration).
pub fn detach(source: &Path) -> Result<(), MigrateError> {
    Filtered::open(source)?
        .detach()
        .map_err(MigrateError::Filter)
}
