//! What the disks say after a crash or a reboot, with no filter attached,
//! and how an interrupted switch is finished or rolled back.
//!
//! The switch writes, in this order: the source's head saved in the state
//! directory (`source-head.bin`, with `source-head.json` naming the
//! attachment it belongs to), the target flushed, the retire marker over
//! the source's head, the saved head onto the target. So after a crash
//! exactly one of these holds:
//!
//! - the source has no marker: it is authoritative; the target's head is
//!   blank, no tool recognises it (a half-copied target);
//! - the source has the marker and the target's head is blank: the switch
//!   was interrupted between the two writes; neither device is mountable.
//!   The target holds every other byte (it was flushed before the marker):
//!   writing the saved head to it finishes the switch, writing it back to
//!   the source rolls it back;
//! - the source has the marker and the target's head is written: the target
//!   is authoritative.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use blkmig_core::abi::{self, RetireMarker};

use crate::buffer::AlignedBuf;
use crate::device::{Access, DevId, Device, Kind, Probe};
use crate::error::{Error, Refusal};

/// File name of the saved head in a source's state directory.
pub const HEAD_FILE: &str = "source-head.bin";
/// File name of what the saved head belongs to.
pub const HEAD_META_FILE: &str = "source-head.json";
/// File name of the record of a started migration.
pub const MIGRATION_FILE: &str = "migration.json";

/// What the saved head belongs to, kept beside it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HeadMeta {
    /// The attachment that switched (the marker carries the same).
    pub migration_id: u64,
    /// Bytes of the head.
    pub head_bytes: u64,
    /// crc32 of the saved bytes.
    pub crc32: u32,
    /// The source, as the operator named it.
    pub source: PathBuf,
    /// The target, as the operator named it.
    pub target: PathBuf,
}

/// A migration `migrate start` began (kept until it is abandoned).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MigrationRecord {
    /// The attachment.
    pub migration_id: u64,
    /// The source, as the operator named it.
    pub source: PathBuf,
    /// The target, as the operator named it.
    pub target: PathBuf,
    /// The target's device number when it started ("MAJ:MIN").
    pub target_dev: String,
    /// Region size in bytes.
    pub region_bytes: u64,
    /// Seconds since the epoch.
    pub started_at: u64,
}

/// A source's state directory: `STATE_DIR/MAJ-MIN`.
pub fn source_dir(state_dir: &Path, id: DevId) -> PathBuf {
    let name = match id {
        DevId::Block { major, minor } => format!("{major}-{minor}"),
        DevId::File { dev, ino } => format!("file-{dev}-{ino}"),
    };
    state_dir.join(name)
}

/// Writes `bytes` to `path` durably: a temporary file, fsync, rename, fsync
/// of the directory.
pub fn write_durably(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("tmp");
    {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// The whole disk a block device number belongs to (itself if it is one).
fn whole_disk(major: u32, minor: u32) -> (u32, u32) {
    let sys = PathBuf::from(format!("/sys/dev/block/{major}:{minor}"));
    if !sys.join("partition").exists() {
        return (major, minor);
    }
    fs::read_to_string(sys.join("../dev"))
        .ok()
        .and_then(|t| {
            let (a, b) = t.trim().split_once(':')?;
            Some((a.parse().ok()?, b.parse().ok()?))
        })
        .unwrap_or((major, minor))
}

/// Refuses a state directory that lives on `dev` (or on its disk, when
/// `dev` is a whole disk, or on the same partition): after the switch the
/// source is retired, and the target has no head until the switch ends.
pub fn check_state_dir(state_dir: &Path, dev: &Probe) -> Result<(), Error> {
    use std::os::unix::fs::MetadataExt;
    let DevId::Block { major, minor } = dev.id else {
        return Ok(());
    };
    // The directory may not exist yet: the nearest ancestor that does.
    let Some(meta) = state_dir.ancestors().find_map(|a| fs::metadata(a).ok()) else {
        return Ok(());
    };
    let st = meta.dev();
    let (smaj, smin) = (libc::major(st), libc::minor(st));
    let on_it = (smaj, smin) == (major, minor)
        || (whole_disk(smaj, smin) == (major, minor) && whole_disk(major, minor) == (major, minor));
    if on_it {
        return Err(Error::refused(
            &dev.path,
            Refusal::HoldsStateDir(state_dir.to_owned()),
        ));
    }
    Ok(())
}

/// Records that a migration started (for `migrate status` after a reboot).
pub fn record_start(state_dir: &Path, src: DevId, rec: &MigrationRecord) -> std::io::Result<()> {
    let json = serde_json::to_vec_pretty(rec).map_err(std::io::Error::other)?;
    write_durably(&source_dir(state_dir, src).join(MIGRATION_FILE), &json)
}

/// Forgets a migration that was abandoned (its target is of no use).
pub fn record_abandoned(state_dir: &Path, src: DevId) {
    let _ = fs::remove_file(source_dir(state_dir, src).join(MIGRATION_FILE));
}

/// The retire marker at the start of `head`, if there is one.
pub fn parse_marker(head: &[u8]) -> Option<RetireMarker> {
    let bytes = head.get(..std::mem::size_of::<RetireMarker>())?;
    if bytes[..16] != abi::RETIRE_MAGIC {
        return None;
    }
    let u32_at = |o: usize| u32::from_ne_bytes(bytes[o..o + 4].try_into().unwrap_or([0; 4]));
    let u64_at = |o: usize| u64::from_ne_bytes(bytes[o..o + 8].try_into().unwrap_or([0; 8]));
    Some(RetireMarker {
        magic: abi::RETIRE_MAGIC,
        version: u32_at(16),
        target_major: u32_at(20),
        target_minor: u32_at(24),
        reserved: u32_at(28),
        switched_at: u64_at(32),
        target_sectors: u64_at(40),
        migration_id: u64_at(48),
        head_bytes: u64_at(56),
    })
}

/// A saved head found in the state directory.
#[derive(Clone, Debug)]
pub struct SavedHead {
    /// The `.bin` file.
    pub path: PathBuf,
    /// What it belongs to.
    pub meta: HeadMeta,
    /// Its bytes (their crc32 matches `meta.crc32`).
    pub bytes: Vec<u8>,
}

/// The saved head of the attachment `migration_id`: first in the source's
/// own state directory, then in any other (device numbers can change across
/// a reboot). Heads whose bytes do not match their crc32 are skipped.
pub fn find_saved_head(state_dir: &Path, src: DevId, migration_id: u64) -> Option<SavedHead> {
    let own = source_dir(state_dir, src);
    let mut dirs = vec![own.clone()];
    if let Ok(rd) = fs::read_dir(state_dir) {
        dirs.extend(rd.flatten().map(|e| e.path()).filter(|p| *p != own));
    }
    dirs.into_iter().find_map(|d| {
        let meta: HeadMeta =
            serde_json::from_slice(&fs::read(d.join(HEAD_META_FILE)).ok()?).ok()?;
        if meta.migration_id != migration_id {
            return None;
        }
        let path = d.join(HEAD_FILE);
        let bytes = fs::read(&path).ok()?;
        (bytes.len() as u64 == meta.head_bytes && crc32fast::hash(&bytes) == meta.crc32)
            .then_some(SavedHead { path, meta, bytes })
    })
}

/// What the target's head holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TargetHead {
    /// Zeros: no tool recognises the target.
    Blank,
    /// Exactly the source's saved head.
    SavedHead,
    /// Something else (the filesystem wrote to it after the switch, or the
    /// device was never a target).
    Written,
}

/// Which device holds the filesystem.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case", tag = "state")]
pub enum Finding {
    /// No marker: the source is authoritative. `started` is a migration
    /// `migrate start` began and nobody abandoned (its target is a
    /// half-copied target, which no tool recognises).
    SourceAuthoritative {
        /// The recorded migration, if any.
        started: Option<MigrationRecord>,
    },
    /// The switch completed: the target holds the filesystem.
    TargetAuthoritative {
        /// The marker on the source.
        marker: MarkerInfo,
        /// The saved head, if found.
        saved_head: Option<PathBuf>,
    },
    /// The marker is on the source, the target's head is blank: finish
    /// with `migrate recover`, or roll back with `--rollback`.
    InterruptedSwitch {
        /// The marker on the source.
        marker: MarkerInfo,
        /// The saved head, if found.
        saved_head: Option<PathBuf>,
    },
    /// The source is retired; the target was not named or not checked.
    Retired {
        /// The marker on the source.
        marker: MarkerInfo,
        /// The saved head, if found.
        saved_head: Option<PathBuf>,
    },
    /// The source's device is gone (unplugged). What its state directory
    /// and the target say.
    SourceRemoved {
        /// The source's device number when its migration started ("MAJ:MIN").
        source_dev: String,
        /// The migration's target (as named, or as recorded).
        target: PathBuf,
        /// The target's head was written: the switch completed, and the
        /// target holds the filesystem.
        switched: bool,
        /// Where a filesystem of the removed device is still mounted: with
        /// `switched`, blkmig serves it from the target until it is
        /// unmounted.
        mounts: Vec<PathBuf>,
    },
}

/// The retire marker, for people and JSON.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct MarkerInfo {
    /// Target device number at the switch ("MAJ:MIN").
    pub target_dev: String,
    /// Target size in bytes.
    pub target_bytes: u64,
    /// Seconds since the epoch.
    pub switched_at: u64,
    /// The attachment.
    pub migration_id: u64,
    /// Bytes of the head the marker replaced.
    pub head_bytes: u64,
}

impl From<&RetireMarker> for MarkerInfo {
    fn from(m: &RetireMarker) -> Self {
        Self {
            target_dev: format!("{}:{}", m.target_major, m.target_minor),
            target_bytes: m.target_sectors << 9,
            switched_at: m.switched_at,
            migration_id: m.migration_id,
            head_bytes: m.head_bytes,
        }
    }
}

fn read_head(dev: &Device, len: u64) -> Result<Vec<u8>, Error> {
    let len = len.min(dev.size().0);
    let mut buf = AlignedBuf::new(dev.mem_align(), len as usize);
    dev.read_exact_at(&mut buf, 0)?;
    Ok(buf.to_vec())
}

fn open_block(path: &Path, write: bool) -> Result<Device, Error> {
    let p = Probe::new(path)?;
    if p.kind != Kind::Block {
        return Err(Error::refused(path, Refusal::NotBlock));
    }
    Device::open(
        &p,
        Access {
            write,
            direct: true,
            exclusive: write,
        },
    )
}

/// Reads the source's head (and the target's, if named) and says which
/// device holds the filesystem.
pub fn inspect(src: &Path, tgt: Option<&Path>, state_dir: &Path) -> Result<Finding, Error> {
    if !src.exists() {
        if let Some(f) = inspect_removed(src, tgt, state_dir)? {
            return Ok(f);
        }
    }
    let s = open_block(src, false)?;
    let head = read_head(&s, abi::RETIRE_BYTES)?;
    let Some(marker) = parse_marker(&head) else {
        let started = fs::read(source_dir(state_dir, s.id()).join(MIGRATION_FILE))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        return Ok(Finding::SourceAuthoritative { started });
    };
    let saved = find_saved_head(state_dir, s.id(), marker.migration_id);
    let info = MarkerInfo::from(&marker);
    let saved_head = saved.as_ref().map(|h| h.path.clone());
    let Some(tgt) = tgt else {
        return Ok(Finding::Retired {
            marker: info,
            saved_head,
        });
    };
    let t = open_block(tgt, false)?;
    Ok(match target_head(&t, &marker, saved.as_ref())? {
        TargetHead::Blank => Finding::InterruptedSwitch {
            marker: info,
            saved_head,
        },
        TargetHead::SavedHead | TargetHead::Written => Finding::TargetAuthoritative {
            marker: info,
            saved_head,
        },
    })
}

/// [`inspect`] for a source whose device node is gone: the newest migration
/// recorded under that name in `state_dir`, or `None` if there is none.
fn inspect_removed(
    src: &Path,
    tgt: Option<&Path>,
    state_dir: &Path,
) -> Result<Option<Finding>, Error> {
    let newest = fs::read_dir(state_dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let (major, minor) = name.split_once('-')?;
            let (major, minor): (u32, u32) = (major.parse().ok()?, minor.parse().ok()?);
            let rec: MigrationRecord =
                serde_json::from_slice(&fs::read(e.path().join(MIGRATION_FILE)).ok()?).ok()?;
            (rec.source == src).then_some((format!("{major}:{minor}"), rec))
        })
        .max_by_key(|(_, rec)| rec.started_at);
    let Some((source_dev, rec)) = newest else {
        return Ok(None);
    };
    let target = tgt.map_or_else(|| rec.target.clone(), Path::to_path_buf);
    // The copier never writes the target's head: only the switch does.
    let t = open_block(&target, false)?;
    let switched = read_head(&t, abi::RETIRE_BYTES)?.iter().any(|&b| b != 0);
    let mounts = fs::read_to_string("/proc/self/mountinfo")
        .map(|m| mounts_of(&m, &source_dev, src))
        .unwrap_or_default();
    Ok(Some(Finding::SourceRemoved {
        source_dev,
        target,
        switched,
        mounts,
    }))
}

/// Mount points in `mountinfo` (the format of /proc/self/mountinfo) of
/// device `dev` ("MAJ:MIN", named `path`) or of one of its partitions (a
/// mount of `path` followed by a partition number, `1` or `p1`, on the same
/// major).
fn mounts_of(mountinfo: &str, dev: &str, path: &Path) -> Vec<PathBuf> {
    let major = dev.split(':').next().unwrap_or("");
    let path = path.to_string_lossy();
    let partition = |name: &str| {
        name.strip_prefix(path.as_ref())
            .map(|n| n.strip_prefix('p').unwrap_or(n))
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
    };
    mountinfo
        .lines()
        .filter_map(|l| {
            let mut f = l.split(' ');
            let (dv, mp) = (f.nth(2)?, f.nth(1)?);
            let source = l.split(" - ").nth(1)?.split(' ').nth(1)?;
            let ours = dv == dev
                || (dv.split(':').next() == Some(major) && partition(&unescape_mount(source)));
            ours.then(|| PathBuf::from(unescape_mount(mp)))
        })
        .collect()
}

/// Undoes the octal escapes (`\040` for a space) of a mountinfo field.
fn unescape_mount(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let oct = b.get(i + 1..i + 4).and_then(|o| {
            std::str::from_utf8(o)
                .ok()
                .and_then(|o| u8::from_str_radix(o, 8).ok())
        });
        match (b[i], oct) {
            (b'\\', Some(c)) => {
                out.push(c);
                i += 4;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn target_head(
    t: &Device,
    marker: &RetireMarker,
    saved: Option<&SavedHead>,
) -> Result<TargetHead, Error> {
    let th = read_head(t, marker.head_bytes.max(512))?;
    Ok(if th.iter().all(|&b| b == 0) {
        TargetHead::Blank
    } else if saved.is_some_and(|h| h.bytes == th) {
        TargetHead::SavedHead
    } else {
        TargetHead::Written
    })
}

/// Why `recover` would not act.
#[derive(Debug, thiserror::Error)]
pub enum RecoverError {
    /// Device work failed or was refused.
    #[error(transparent)]
    Device(#[from] Error),
    /// The source carries no marker.
    #[error("{} is not retired: it holds the filesystem; there is nothing to recover (a half-copied target is started again with `migrate start`)", .0.display())]
    NotRetired(PathBuf),
    /// The switch completed.
    #[error("the switch completed: {} holds the filesystem (its head was written); rolling back would lose every write since the switch", .0.display())]
    Completed(PathBuf),
    /// The saved head is missing.
    #[error("the saved head of migration {id:016x} is not in {}: without it neither device can be made whole; point --state-dir at the directory `migrate start` used", .dir.display())]
    NoSavedHead {
        /// The attachment.
        id: u64,
        /// Where it was looked for.
        dir: PathBuf,
    },
    /// The target is not the one the marker names.
    #[error("{} is {target_bytes} bytes, but the source was retired for a target of {marker_bytes} bytes: not the migration's target", .path.display())]
    WrongTarget {
        /// The target named.
        path: PathBuf,
        /// Its size.
        target_bytes: u64,
        /// The size the marker records.
        marker_bytes: u64,
    },
}

/// What `recover` did.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Recovered {
    /// The saved head was written to the target: it holds the filesystem.
    Finished,
    /// The saved head was written back to the source and the target's head
    /// blanked: the source holds the filesystem again.
    RolledBack,
}

/// Finishes (writes the saved head to the target) or, with `rollback`,
/// undoes (writes it back to the source, blanks the target's head) a switch
/// that was interrupted between the retire marker and the target's head.
/// Nothing is written unless the disks are in exactly that state.
pub fn recover(
    src: &Path,
    tgt: &Path,
    state_dir: &Path,
    rollback: bool,
) -> Result<Recovered, RecoverError> {
    for p in [src, tgt] {
        let probe = Probe::new(p)?;
        probe.check_unused()?;
    }
    let s = open_block(src, true)?;
    let t = open_block(tgt, true)?;
    let head = read_head(&s, abi::RETIRE_BYTES)?;
    let marker = parse_marker(&head).ok_or_else(|| RecoverError::NotRetired(src.to_owned()))?;
    if t.size().0 != marker.target_sectors << 9 {
        return Err(RecoverError::WrongTarget {
            path: tgt.to_owned(),
            target_bytes: t.size().0,
            marker_bytes: marker.target_sectors << 9,
        });
    }
    let saved = find_saved_head(state_dir, s.id(), marker.migration_id).ok_or_else(|| {
        RecoverError::NoSavedHead {
            id: marker.migration_id,
            dir: state_dir.to_owned(),
        }
    })?;
    match target_head(&t, &marker, Some(&saved))? {
        TargetHead::Blank => {}
        TargetHead::SavedHead if !rollback => return Ok(Recovered::Finished),
        _ => return Err(RecoverError::Completed(tgt.to_owned())),
    }
    let mut buf = AlignedBuf::new(s.mem_align().max(t.mem_align()), saved.bytes.len());
    buf.copy_from_slice(&saved.bytes);
    if rollback {
        // The target's head is blank already: the source gets its own back.
        s.write_all_at(&buf, 0)?;
        s.flush()?;
        Ok(Recovered::RolledBack)
    } else {
        t.write_all_at(&buf, 0)?;
        t.flush()?;
        Ok(Recovered::Finished)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn marker_bytes(id: u64, head: u64) -> Vec<u8> {
        let mut v = vec![0u8; 4096];
        v[..16].copy_from_slice(&abi::RETIRE_MAGIC);
        v[16..20].copy_from_slice(&abi::ABI_VERSION.to_ne_bytes());
        v[40..48].copy_from_slice(&2048u64.to_ne_bytes());
        v[48..56].copy_from_slice(&id.to_ne_bytes());
        v[56..64].copy_from_slice(&head.to_ne_bytes());
        v
    }

    #[test]
    fn mounts_of_a_device_are_found_with_their_escapes() {
        let mi = "22 1 0:21 / /proc rw - proc proc rw
31 1 253:0 / /mnt/src rw,relatime - ext4 /dev/vda rw
32 1 253:16 / /mnt/tgt rw - ext4 /dev/vdb rw
33 1 253:0 /sub /srv/my\\040data rw - ext4 /dev/vda rw
";
        let vda = Path::new("/dev/vda");
        assert_eq!(
            mounts_of(mi, "253:0", vda),
            vec![PathBuf::from("/mnt/src"), PathBuf::from("/srv/my data")]
        );
        assert_eq!(mounts_of(mi, "253:1", vda), Vec::<PathBuf>::new());
    }

    #[test]
    fn mounts_of_the_partitions_of_a_removed_disk_are_found() {
        let mi = "31 1 253:1 / /mnt/a rw - ext4 /dev/vda1 rw
32 1 253:16 / /mnt/b rw - ext4 /dev/vdb1 rw
33 1 259:3 / /mnt/c rw - ext4 /dev/nvme0n1p2 rw
34 1 253:2 / /mnt/d rw - ext4 /dev/vdaa rw
35 1 8:1 / /mnt/e rw - ext4 /dev/vda1 rw
";
        assert_eq!(
            mounts_of(mi, "253:0", Path::new("/dev/vda")),
            vec![PathBuf::from("/mnt/a")]
        );
        assert_eq!(
            mounts_of(mi, "259:0", Path::new("/dev/nvme0n1")),
            vec![PathBuf::from("/mnt/c")]
        );
        assert_eq!(unescape_mount("a\\134b\\0"), "a\\b\\0");
    }

    #[test]
    fn a_marker_is_parsed_and_anything_else_is_not() {
        let m = parse_marker(&marker_bytes(7, 65536)).unwrap_or_else(|| panic!("no marker"));
        assert_eq!(
            (m.migration_id, m.head_bytes, m.target_sectors),
            (7, 65536, 2048)
        );
        assert_eq!(parse_marker(&[0u8; 4096]), None);
        assert_eq!(parse_marker(&abi::RETIRE_MAGIC), None);
    }

    #[test]
    fn the_saved_head_is_found_by_its_migration_and_checked() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let other = dir.path().join("8-16");
        let bytes = vec![5u8; 8192];
        let meta = HeadMeta {
            migration_id: 42,
            head_bytes: 8192,
            crc32: crc32fast::hash(&bytes),
            source: "/dev/x".into(),
            target: "/dev/y".into(),
        };
        write_durably(&other.join(HEAD_FILE), &bytes).unwrap_or_else(|e| panic!("{e}"));
        let json = serde_json::to_vec(&meta).unwrap_or_else(|e| panic!("{e}"));
        write_durably(&other.join(HEAD_META_FILE), &json).unwrap_or_else(|e| panic!("{e}"));
        // Found under another device number; not for another migration.
        let me = DevId::Block { major: 8, minor: 0 };
        let h = find_saved_head(dir.path(), me, 42).unwrap_or_else(|| panic!("not found"));
        assert_eq!(h.bytes, bytes);
        assert!(find_saved_head(dir.path(), me, 43).is_none());
        // A head that does not match its crc is not used.
        write_durably(&other.join(HEAD_FILE), &[6u8; 8192]).unwrap_or_else(|e| panic!("{e}"));
        assert!(find_saved_head(dir.path(), me, 42).is_none());
    }
}
