//! What blkmig finds on a device, live or offline (`migrate status`), and
//! on every block device of the system (`migrate list`).

use std::fs;
use std::path::{Path, PathBuf};

use blkmig_core::abi::Status;
use serde_json::Value;

use crate::device::Probe;
use crate::filter::{FilterError, Filtered};
use crate::migration::{mode_name, MigrateError};
use crate::output;
use crate::recover::{self, Finding};

/// What `migrate status` reports on a source.
#[derive(Clone, Debug)]
pub enum Look {
    /// A filter is attached: the module's STATUS.
    Live(Status),
    /// No filter attached (or no module, or no filter hook): what the
    /// disks hold.
    Offline(Finding),
}

impl Look {
    /// The object `migrate status --json` prints.
    pub fn json(&self) -> Value {
        match self {
            Look::Live(st) => output::status(st),
            Look::Offline(f) => output::status_offline(f),
        }
    }
}

/// The STATUS of the filter attached to `source`, or `None` when there is
/// none to ask: no filter attached, no module loaded, or a kernel without
/// the filter hook (booted without the blkmig patches after a migration).
pub fn live_status(source: &Path) -> Result<Option<Status>, FilterError> {
    match Filtered::open(source).and_then(|f| f.status()) {
        Ok(st) => Ok(Some(st)),
        Err(FilterError::NoHook { .. } | FilterError::NoModule { .. }) => Ok(None),
        Err(e) if e.errno() == libc::ENOENT => Ok(None),
        Err(e) => Err(e),
    }
}

/// What `migrate status` says of `source`: its filter's STATUS, or else
/// what the disks hold (`target`, if named, tells a completed switch from
/// an interrupted one).
pub fn look(source: &Path, target: Option<&Path>, state_dir: &Path) -> Result<Look, MigrateError> {
    if let Some(st) = live_status(source).map_err(MigrateError::Filter)? {
        return Ok(Look::Live(st));
    }
    Ok(Look::Offline(recover::inspect(source, target, state_dir)?))
}

/// Whether the blkmig module is loaded.
pub fn module_loaded() -> bool {
    Path::new("/sys/module/blkmig").exists()
}

/// At most how many filters the loaded module has attached: its reference
/// count, which every attached filter holds (the hook pins the filter's
/// module until it detaches; an attach in progress counts too); `None` if
/// unknown.
pub fn filters_attached() -> Option<u64> {
    fs::read_to_string("/sys/module/blkmig/refcnt")
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// A warning when the module that answered STATUS speaks another ABI
/// than this `migrate`.
pub fn abi_warning(st: &Status) -> Option<String> {
    abi_mismatch(st.version)
}

/// A warning when the loaded module speaks ABI `module`, not this
/// `migrate`'s.
pub fn abi_mismatch(module: u32) -> Option<String> {
    let ours = blkmig_core::abi::ABI_VERSION;
    (module != ours).then(|| {
        format!(
            "the loaded blkmig module speaks ABI {module}, this migrate ABI {ours}: install the module built with this migrate (the blkmig-module package of the same version)"
        )
    })
}

/// One block device in `migrate list`.
#[derive(Clone, Debug)]
pub struct Entry {
    /// `/dev/NAME`.
    pub device: PathBuf,
    /// Its device number, "MAJ:MIN".
    pub dev: String,
    /// Its size in bytes.
    pub size_bytes: u64,
    /// What was found.
    pub found: Found,
}

/// What `migrate list` found on a device.
#[derive(Clone, Debug)]
pub enum Found {
    /// blkmig is attached, or the disks show one of its migrations.
    Look {
        /// What `migrate status` says.
        look: Look,
        /// The migration's target, as a device path, when it is present.
        target: Option<PathBuf>,
    },
    /// The device could not be looked at.
    Error(String),
}

impl Entry {
    /// One word for the state: the filter's mode (`clone`, `redirect`,
    /// `failed`), or what the disks show (`retired`, `switched`,
    /// `interrupted_switch`, `copy_interrupted`, `none`), or `error`.
    pub fn state(&self) -> &'static str {
        match &self.found {
            Found::Look {
                look: Look::Live(st),
                ..
            } => mode_name(st.mode),
            Found::Look {
                look: Look::Offline(f),
                ..
            } => match f {
                Finding::SourceAuthoritative { started: None } => "none",
                Finding::SourceAuthoritative { started: Some(_) } => "copy_interrupted",
                Finding::Retired { .. } => "retired",
                Finding::TargetAuthoritative { .. } => "switched",
                Finding::InterruptedSwitch { .. } => "interrupted_switch",
                Finding::SourceRemoved { .. } => "removed",
            },
            Found::Error(_) => "error",
        }
    }

    /// Whether blkmig has to do with this device (a filter, a marker, a
    /// recorded migration).
    pub fn ours(&self) -> bool {
        !matches!(self.state(), "none" | "error")
    }

    /// The `list --json` object of this device.
    pub fn json(&self) -> Value {
        let (status, target, error) = match &self.found {
            Found::Look { look, target } => (look.json(), target.as_ref(), None),
            Found::Error(e) => (Value::Null, None, Some(e.as_str())),
        };
        let synced = match &self.found {
            Found::Look {
                look: Look::Live(st),
                ..
            } => Value::from(output::synced_percent(st)),
            _ => Value::Null,
        };
        let mut j = serde_json::json!({
            "device": self.device,
            "dev": self.dev,
            "size_bytes": self.size_bytes,
            "state": self.state(),
            "target": target,
            "synced_percent": synced,
            "status": status,
        });
        if let Some(e) = error {
            j["error"] = e.into();
        }
        j
    }
}

/// The `list --json` object.
pub fn json(entries: &[Entry]) -> Value {
    output::versioned(serde_json::json!({
        "devices": entries.iter().map(Entry::json).collect::<Vec<_>>(),
    }))
}

/// Every block device of the system (from /sys/class/block), each with
/// what blkmig finds on it. Devices of size 0 (an empty drive, an unset
/// loop device) are left out.
pub fn list(state_dir: &Path) -> Vec<Entry> {
    let Ok(rd) = fs::read_dir("/sys/class/block") else {
        return Vec::new();
    };
    let mut names: Vec<PathBuf> = rd.flatten().map(|e| e.path()).collect();
    names.sort();
    let mut devices: Vec<(usize, PathBuf, String, u64)> = names
        .iter()
        .enumerate()
        .filter_map(|(i, sys)| {
            let dev = fs::read_to_string(sys.join("dev")).ok()?.trim().to_owned();
            let sectors: u64 = fs::read_to_string(sys.join("size"))
                .ok()?
                .trim()
                .parse()
                .ok()?;
            let device = PathBuf::from(output::dev_path(&dev)?);
            (sectors > 0 && device.exists()).then_some((i, device, dev, sectors))
        })
        .collect();
    // Asking a filter means opening the device for writing (the hook's
    // ioctls need it), and udev probes a device again when such an open is
    // closed. So only as many devices are asked as the module may have
    // filters attached: none without the module or with no reference on
    // it; the devices with a state record first. The others are only read.
    let loaded = module_loaded();
    let attached = || filters_attached().unwrap_or(u64::MAX);
    let mut limit = if loaded { attached() } else { 0 };
    let mut found = 0;
    let known = |dev: &str| {
        let name = dev.replace(':', "-");
        state_dir.join(name).is_dir()
    };
    devices.sort_by_key(|(i, _, dev, _)| (!known(dev), *i));
    let mut entries: Vec<(usize, Entry)> = devices
        .into_iter()
        .map(|(i, device, dev, sectors)| {
            // The count again once it is reached: a filter attached
            // meanwhile is still asked.
            if loaded && found >= limit {
                limit = attached();
            }
            let look = examine(&device, state_dir, found < limit);
            if matches!(
                look,
                Found::Look {
                    look: Look::Live(_),
                    ..
                }
            ) {
                found += 1;
            }
            let entry = Entry {
                found: look,
                device,
                dev,
                size_bytes: sectors << 9,
            };
            (i, entry)
        })
        .collect();
    // Back in the order of /sys/class/block.
    entries.sort_by_key(|(i, _)| *i);
    entries.into_iter().map(|(_, e)| e).collect()
}

/// What blkmig finds on `device`; `live`: ask the filter first.
pub fn examine(device: &Path, state_dir: &Path, live: bool) -> Found {
    let found = || -> Result<Found, MigrateError> {
        if live {
            if let Some(st) = live_status(device).map_err(MigrateError::Filter)? {
                let target = output::dev_path(&format!("{}:{}", st.target_major, st.target_minor));
                return Ok(Found::Look {
                    look: Look::Live(st),
                    target: target.map(PathBuf::from),
                });
            }
        }
        let f = recover::inspect(device, None, state_dir)?;
        let Finding::Retired { marker, .. } = &f else {
            let target = match &f {
                Finding::SourceAuthoritative { started: Some(r) } => Some(r.target.clone()),
                _ => None,
            };
            return Ok(Found::Look {
                look: Look::Offline(f),
                target,
            });
        };
        // A retired source: its target, if it can be found, says whether
        // the switch completed.
        let target = retired_target(device, state_dir, marker);
        let f = match &target {
            Some(t) => recover::inspect(device, Some(t), state_dir)?,
            None => f,
        };
        Ok(Found::Look {
            look: Look::Offline(f),
            target,
        })
    };
    found().unwrap_or_else(|e| Found::Error(crate::error::chain_text(&e)))
}

/// The target a retired source switched to, if a device of the size its
/// marker records is found: the one its saved head names, or the one with
/// the device number the marker records.
fn retired_target(
    source: &Path,
    state_dir: &Path,
    marker: &recover::MarkerInfo,
) -> Option<PathBuf> {
    let named = Probe::new(source)
        .ok()
        .and_then(|p| recover::find_saved_head(state_dir, p.id, marker.migration_id))
        .map(|h| h.meta.target);
    let numbered = output::dev_path(&marker.target_dev).map(PathBuf::from);
    [named, numbered].into_iter().flatten().find(|t| {
        Probe::new(t).is_ok_and(|p| p.kind == crate::device::Kind::Block)
            && block_size(t) == Some(marker.target_bytes)
    })
}

/// The size of block device `path` in bytes, from sysfs.
fn block_size(path: &Path) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    let rdev = fs::metadata(path).ok()?.rdev();
    let sys = format!(
        "/sys/dev/block/{}:{}/size",
        rustix::fs::major(rdev),
        rustix::fs::minor(rdev)
    );
    let sectors: u64 = fs::read_to_string(sys).ok()?.trim().parse().ok()?;
    Some(sectors << 9)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_module_of_another_abi_is_warned_about() {
        let ours = blkmig_core::abi::ABI_VERSION;
        let st = |version| Status {
            version,
            ..Status::default()
        };
        assert_eq!(abi_warning(&st(ours)), None);
        let w = abi_warning(&st(ours + 1)).unwrap_or_default();
        assert!(
            w.contains(&format!("ABI {}", ours + 1)) && w.contains(&format!("ABI {ours}")),
            "{w}"
        );
    }
}
