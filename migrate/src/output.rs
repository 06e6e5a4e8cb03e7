//! What `migrate` prints for automation. Every JSON object it prints carries
//! [`SCHEMA_VERSION`]; `docs/json.md` describes each kind field by field,
//! and [`crate::jsondoc`] checks an output against it.

use std::path::Path;

use blkmig_core::abi::{self, Status};
use serde_json::Value;

use crate::migration::{self, mode_name, Summary};
use crate::recover::Finding;

/// Version of the JSON outputs: bumped when a field is removed, renamed or
/// changes its meaning (a new field does not bump it).
pub const SCHEMA_VERSION: u32 = 1;

/// `v` (an object) with `schema_version` set.
pub fn versioned(mut v: Value) -> Value {
    if let Value::Object(m) = &mut v {
        m.insert("schema_version".into(), SCHEMA_VERSION.into());
    }
    v
}

/// Percent of the regions in sync, one decimal, rounded down.
pub fn synced_percent(st: &Status) -> f64 {
    if st.regions_total == 0 {
        100.0
    } else {
        (st.regions_synced as f64 * 1000.0 / st.regions_total as f64).floor() / 10.0
    }
}

/// `migrate status --json` with a filter attached: the module's STATUS.
pub fn status(st: &Status) -> Value {
    versioned(serde_json::json!({
        "mode": mode_name(st.mode),
        "module_abi": st.version,
        "holding": st.flags & abi::STATUS_HOLDING != 0,
        "retire_failed": st.flags & abi::STATUS_RETIRE_FAILED != 0,
        "target_head_dirty": st.flags & abi::STATUS_TARGET_HEAD_DIRTY != 0,
        "head_writes": st.head_writes,
        "region_bytes": 1u64 << st.region_shift,
        "source_bytes": st.source_sectors << 9,
        "target_bytes": st.target_sectors << 9,
        "regions_total": st.regions_total,
        "regions_synced": st.regions_synced,
        "synced_percent": synced_percent(st),
        "copy_conflicts": st.copy_conflicts,
        "copy_busy": st.copy_busy,
        "writes_seen": st.writes_seen,
        "writes_mirrored": st.writes_mirrored,
        "writes_held": st.writes_held,
        "bios_redirected": st.bios_redirected,
        "failure": st.failure,
        "failure_text": migration::failure_text(st),
        "failure_errno": st.failure_errno,
        "target_dev": format!("{}:{}", st.target_major, st.target_minor),
        "holds": st.holds,
        "hold_longest_ns": st.hold_longest_ns,
        "region_holds": st.region_holds,
        "region_writes_held": st.region_writes_held,
        "region_hold_longest_ns": st.region_hold_longest_ns,
        "migration_id": format!("{:016x}", st.migration_id),
    }))
}

/// `migrate status --json` with no filter attached: what the disks hold.
pub fn status_offline(f: &Finding) -> Value {
    let mut j = serde_json::to_value(f).unwrap_or_default();
    j["mode"] = match f {
        Finding::SourceRemoved { .. } => "removed",
        _ => "detached",
    }
    .into();
    versioned(j)
}

/// The last line of `migrate start --json`.
pub fn start_done(s: &Summary) -> Value {
    let mut j = serde_json::to_value(s).unwrap_or_default();
    j["event"] = "done".into();
    versioned(j)
}

/// The report of `migrate rebalance --json`.
pub fn rebalance(r: &crate::rebalance::Report) -> Value {
    versioned(serde_json::to_value(r).unwrap_or_default())
}

/// A device path for a device number ("MAJ:MIN"), from sysfs: `/dev/NAME`,
/// or `None` if no such device exists now.
pub fn dev_path(dev: &str) -> Option<String> {
    let uevent =
        std::fs::read_to_string(Path::new("/sys/dev/block").join(dev).join("uevent")).ok()?;
    uevent
        .lines()
        .find_map(|l| l.strip_prefix("DEVNAME="))
        .map(|n| format!("/dev/{n}"))
}
