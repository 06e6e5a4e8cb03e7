//! `migrate copy` on real block devices (loop devices).
//!
//! This tier needs root: it runs only with `BLKMIG_ROOT_TESTS=1` (the
//! project's test command sets it) and then fails, rather than skips, when
//! it cannot do its work. Every loop device and mount is undone on drop.

mod common;

use common::{check_json_lines, enabled, pattern, run};

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn migrate(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_migrate"))
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run migrate: {e}"))
}

/// A loop device over a file with the given contents; detached on drop.
struct Loop {
    dev: String,
    file: PathBuf,
    _dir: tempfile::TempDir,
}

impl Loop {
    fn new(data: &[u8], partitions: bool) -> Self {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let file = dir.path().join("disk.img");
        fs::write(&file, data).unwrap_or_else(|e| panic!("{e}"));
        let f = file.to_string_lossy().into_owned();
        let mut args = vec!["--find", "--show", "--direct-io=on"];
        if partitions {
            args.push("--partscan");
        }
        args.push(&f);
        let dev = run("losetup", &args);
        Self {
            dev,
            file,
            _dir: dir,
        }
    }

    fn read(&self) -> Vec<u8> {
        fs::read(&self.dev).unwrap_or_else(|e| panic!("read {}: {e}", self.dev))
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.dev]).status();
    }
}

/// A mount, unmounted on drop.
struct Mount {
    dir: tempfile::TempDir,
}

impl Mount {
    fn new(dev: &str) -> Self {
        run("mkfs.ext4", &["-q", "-F", dev]);
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        run("mount", &[dev, &dir.path().to_string_lossy()]);
        Self { dir }
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

fn err(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn copies_between_block_devices_exactly() {
    if !enabled() {
        return;
    }
    let data = pattern(24 << 20, 1);
    let src = Loop::new(&data, false);
    let tgt = Loop::new(&pattern(32 << 20, 2), false);
    let o = migrate(&["copy", &src.dev, &tgt.dev, "--verify", "-q"]);
    assert!(o.status.success(), "{}", err(&o));
    let out = tgt.read();
    assert!(out[..data.len()] == data[..], "target differs from source");
    assert!(
        out[data.len()..] == pattern(32 << 20, 2)[data.len()..],
        "bytes past the source changed"
    );
}

#[test]
fn sparse_copy_zeroes_regions_on_a_block_device() {
    if !enabled() {
        return;
    }
    let mut data = vec![0u8; 8 << 20];
    data[3 << 20..4 << 20].copy_from_slice(&pattern(1 << 20, 3));
    let src = Loop::new(&data, false);
    let tgt = Loop::new(&pattern(8 << 20, 4), false);
    let o = migrate(&[
        "copy",
        &src.dev,
        &tgt.dev,
        "--sparse",
        "--verify",
        "--json",
        "--region-size",
        "1M",
    ]);
    assert!(o.status.success(), "{}", err(&o));
    assert!(
        tgt.read() == data,
        "zeroed regions do not read back as zeros"
    );
    assert!(String::from_utf8_lossy(&o.stdout).contains("\"bytes_zeroed\":7340032"));
}

#[test]
fn refuses_mounted_devices_and_changes_nothing() {
    if !enabled() {
        return;
    }
    let src = Loop::new(&pattern(16 << 20, 5), false);
    let tgt = Loop::new(&pattern(16 << 20, 6), false);
    let m = Mount::new(&tgt.dev);
    let before = tgt.read();
    let o = migrate(&["copy", &src.dev, &tgt.dev]);
    assert!(!o.status.success());
    let want = format!("{} is mounted on {}", tgt.dev, m.dir.path().display());
    assert!(err(&o).contains(&want), "expected {want:?} in {}", err(&o));
    assert!(
        tgt.read() == before,
        "a refused copy changed the mounted target"
    );
    // A mounted source is refused too (its contents are moving).
    let o = migrate(&["copy", &tgt.dev, &src.dev]);
    assert!(!o.status.success());
    assert!(err(&o).contains("is mounted on"), "{}", err(&o));
}

#[test]
fn refuses_a_device_held_open_exclusively() {
    if !enabled() {
        return;
    }
    let src = Loop::new(&pattern(8 << 20, 7), false);
    let tgt = Loop::new(&pattern(8 << 20, 8), false);
    let before = tgt.read();
    let _held: File = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_EXCL)
        .open(&tgt.dev)
        .unwrap_or_else(|e| panic!("{e}"));
    let o = migrate(&["copy", &src.dev, &tgt.dev]);
    assert!(!o.status.success());
    assert!(err(&o).contains("is in use"), "{}", err(&o));
    assert!(tgt.read() == before);
}

#[test]
fn refuses_a_partition_of_the_other_device() {
    if !enabled() {
        return;
    }
    let disk = Loop::new(&vec![0u8; 16 << 20], true);
    let o = Command::new("sfdisk")
        .args(["-q", &disk.dev])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin
                .take()
                .map(|mut i| i.write_all(b"label: dos\n,4M\n,4M\n"));
            c.wait_with_output()
        })
        .unwrap_or_else(|e| panic!("sfdisk: {e}"));
    assert!(o.status.success(), "sfdisk failed");
    // The re-read sfdisk asks for can race the device being open; add the
    // partitions explicitly (an error here means they are already there).
    let _ = Command::new("partx").args(["-a", &disk.dev]).output();
    let part = format!("{}p1", disk.dev);
    for _ in 0..50 {
        if Path::new(&part).exists() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let before = disk.read();
    let o = migrate(&["copy", &part, &disk.dev]);
    assert!(!o.status.success());
    assert!(
        err(&o).contains("one is a partition of the other"),
        "{}",
        err(&o)
    );
    let o = migrate(&["copy", &disk.dev, &part]);
    assert!(
        err(&o).contains("one is a partition of the other"),
        "{}",
        err(&o)
    );
    assert!(disk.read() == before);
}

#[test]
fn refuses_an_image_file_that_backs_a_loop_device() {
    if !enabled() {
        return;
    }
    let l = Loop::new(&pattern(4 << 20, 9), false);
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let other = dir.path().join("other.img");
    fs::write(&other, pattern(4 << 20, 10)).unwrap_or_else(|e| panic!("{e}"));
    let o = migrate(&["copy", &other.to_string_lossy(), &l.file.to_string_lossy()]);
    assert!(!o.status.success());
    assert!(
        err(&o).contains(&format!("backs loop device {}", l.dev)),
        "{}",
        err(&o)
    );
}

/// The disks as a crash between the retire marker and the target's head
/// leaves them: the source's head replaced by the marker (saved in the
/// state directory under the marker's migration id), the target whole but
/// for a blank head.
struct Interrupted {
    src: Loop,
    tgt: Loop,
    state: tempfile::TempDir,
    data: Vec<u8>,
}

const HEAD: usize = 1 << 20;

fn interrupted_switch() -> Interrupted {
    let data = pattern(8 << 20, 11);
    let mut s = data.clone();
    let mut t = data.clone();
    s[..HEAD].fill(0);
    s[..16].copy_from_slice(&blkmig::core::abi::RETIRE_MAGIC);
    s[40..48].copy_from_slice(&((8u64 << 20) >> 9).to_ne_bytes());
    s[48..56].copy_from_slice(&0xabcdu64.to_ne_bytes());
    s[56..64].copy_from_slice(&(HEAD as u64).to_ne_bytes());
    t[..HEAD].fill(0);
    let state = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    // Saved under another device number than the source's: after a reboot
    // the numbers may differ; the migration id finds it.
    let dir = state.path().join("7-99");
    let meta = blkmig::recover::HeadMeta {
        migration_id: 0xabcd,
        head_bytes: HEAD as u64,
        crc32: crc32fast::hash(&data[..HEAD]),
        source: "/dev/old-source".into(),
        target: "/dev/old-target".into(),
    };
    blkmig::recover::write_durably(&dir.join(blkmig::recover::HEAD_FILE), &data[..HEAD])
        .unwrap_or_else(|e| panic!("{e}"));
    blkmig::recover::write_durably(
        &dir.join(blkmig::recover::HEAD_META_FILE),
        &serde_json::to_vec(&meta).unwrap_or_else(|e| panic!("{e}")),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    Interrupted {
        src: Loop::new(&s, false),
        tgt: Loop::new(&t, false),
        state,
        data,
    }
}

fn offline_state(i: &Interrupted) -> String {
    let st = i.state.path().to_string_lossy().into_owned();
    let o = migrate(&[
        "status",
        &i.src.dev,
        "--target",
        &i.tgt.dev,
        "--state-dir",
        &st,
        "--json",
    ]);
    assert!(o.status.success(), "{}", err(&o));
    let j: serde_json::Value =
        serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {o:?}"));
    j["state"].as_str().unwrap_or("").to_owned()
}

#[test]
fn recover_finishes_an_interrupted_switch_on_the_target() {
    if !enabled() {
        return;
    }
    let i = interrupted_switch();
    assert_eq!(offline_state(&i), "interrupted_switch");
    let st = i.state.path().to_string_lossy().into_owned();
    let o = migrate(&["recover", &i.src.dev, &i.tgt.dev, "--state-dir", &st]);
    assert!(o.status.success(), "{}", err(&o));
    assert!(
        i.tgt.read() == i.data,
        "the target is not whole after recover"
    );
    assert_eq!(offline_state(&i), "target_authoritative");
    // Once finished, neither a second recover nor a rollback writes anything.
    let before = i.src.read();
    let o = migrate(&[
        "recover",
        &i.src.dev,
        &i.tgt.dev,
        "--rollback",
        "--state-dir",
        &st,
    ]);
    assert!(
        !o.status.success(),
        "a rollback after the switch completed was accepted"
    );
    assert!(err(&o).contains("switch completed"), "{}", err(&o));
    assert!(
        i.src.read() == before,
        "a refused rollback changed the source"
    );
}

#[test]
fn recover_rolls_an_interrupted_switch_back_to_the_source() {
    if !enabled() {
        return;
    }
    let i = interrupted_switch();
    let st = i.state.path().to_string_lossy().into_owned();
    let o = migrate(&[
        "recover",
        &i.src.dev,
        &i.tgt.dev,
        "--rollback",
        "--state-dir",
        &st,
    ]);
    assert!(o.status.success(), "{}", err(&o));
    assert!(
        i.src.read() == i.data,
        "the source is not whole after the rollback"
    );
    assert!(
        i.tgt.read()[..HEAD].iter().all(|&b| b == 0),
        "the target's head is not blank after the rollback"
    );
    assert_eq!(offline_state(&i), "source_authoritative");
    let o = migrate(&["recover", &i.src.dev, &i.tgt.dev, "--state-dir", &st]);
    assert!(
        !o.status.success(),
        "recover of a source that is not retired was accepted"
    );
    assert!(err(&o).contains("is not retired"), "{}", err(&o));
}

#[test]
fn recover_without_the_saved_head_changes_nothing() {
    if !enabled() {
        return;
    }
    let i = interrupted_switch();
    let empty = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let (s0, t0) = (i.src.read(), i.tgt.read());
    let e = empty.path().to_string_lossy().into_owned();
    let o = migrate(&["recover", &i.src.dev, &i.tgt.dev, "--state-dir", &e]);
    assert!(
        !o.status.success(),
        "recover without a saved head was accepted"
    );
    assert!(err(&o).contains("saved head"), "{}", err(&o));
    assert!(
        i.src.read() == s0 && i.tgt.read() == t0,
        "a refused recover wrote"
    );
}

/// The live commands name what this machine lacks (the kernel's filter
/// hook, or the module) instead of passing on the driver's errno (a loop
/// device answers an unknown ioctl with EINVAL).
#[test]
fn live_commands_name_the_missing_hook_or_module() {
    if !enabled() {
        return;
    }
    let dev = Loop::new(&pattern(4 << 20, 3), false);
    // (status falls back to reading the disk: it is checked below)
    let o = migrate(&["abort", &dev.dev]);
    let e = err(&o);
    assert_eq!(o.status.code(), Some(1), "{e}");
    let hook = "this kernel has no block-device filter hook (BLKFILTER_* ioctls): boot a kernel with the blkmig patches";
    let module = "the blkmig module is not loaded: modprobe blkmig";
    let attached = "no blkmig filter is attached";
    assert!(
        e.contains(hook) || e.contains(module) || e.contains(attached),
        "{e}"
    );
    assert!(!e.contains("Invalid argument"), "{e}");
    // With no hook, status says what the disk holds instead.
    let o = migrate(&["status", &dev.dev, "--json"]);
    assert!(o.status.success(), "{}", err(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains(r#""mode":"detached""#), "{out}");
}

/// Writes a retire marker over the head of `src`, naming `tgt` as the
/// target, as the switch does.
fn retire(src: &Loop, tgt: &Loop, id: u64) {
    use std::os::unix::fs::MetadataExt;
    let rdev = fs::metadata(&tgt.dev)
        .unwrap_or_else(|e| panic!("{e}"))
        .rdev();
    let tsize = fs::metadata(&tgt.file)
        .unwrap_or_else(|e| panic!("{e}"))
        .len();
    let mut m = vec![0u8; 4096];
    m[..16].copy_from_slice(&blkmig::core::abi::RETIRE_MAGIC);
    m[16..20].copy_from_slice(&blkmig::core::abi::ABI_VERSION.to_ne_bytes());
    m[20..24].copy_from_slice(&(libc::major(rdev)).to_ne_bytes());
    m[24..28].copy_from_slice(&(libc::minor(rdev)).to_ne_bytes());
    m[32..40].copy_from_slice(&1_700_000_000u64.to_ne_bytes());
    m[40..48].copy_from_slice(&(tsize >> 9).to_ne_bytes());
    m[48..56].copy_from_slice(&id.to_ne_bytes());
    m[56..64].copy_from_slice(&65536u64.to_ne_bytes());
    write_dev(&src.dev, &m);
}

fn write_dev(dev: &str, data: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = OpenOptions::new()
        .write(true)
        .open(dev)
        .unwrap_or_else(|e| panic!("{dev}: {e}"));
    f.write_all_at(data, 0)
        .unwrap_or_else(|e| panic!("{dev}: {e}"));
    f.sync_all().unwrap_or_else(|e| panic!("{dev}: {e}"));
}

/// `migrate list --json`'s entry for `dev`, if it lists it.
fn listed(state: &Path, dev: &str) -> Option<serde_json::Value> {
    let o = migrate(&["list", "--json", "--state-dir", &state.to_string_lossy()]);
    assert!(o.status.success(), "{}", err(&o));
    let v = check_json_lines(&["list"], &o.stdout).remove(0);
    v["devices"]
        .as_array()
        .and_then(|d| d.iter().find(|e| e["device"] == dev).cloned())
}

/// Offline `status --json` and `list --json` on a plain device, a retired
/// source whose target's head is blank (an interrupted switch) and one
/// whose target holds the filesystem: as docs/json.md says, and each state
/// named.
#[test]
fn offline_status_and_list_see_a_retired_source() {
    if !enabled() {
        return;
    }
    let state = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let sd = state.path().to_string_lossy().into_owned();
    let tgt = Loop::new(&vec![0u8; 4 << 20], false);
    let src = Loop::new(&pattern(4 << 20, 5), false);
    let status = |extra: &[&str]| {
        let mut args = vec!["status", src.dev.as_str(), "--json", "--state-dir", &sd];
        args.extend_from_slice(extra);
        let o = migrate(&args);
        assert!(o.status.success(), "{}", err(&o));
        check_json_lines(&["status-offline"], &o.stdout).remove(0)
    };
    let v = status(&[]);
    assert_eq!(
        (v["mode"].as_str(), v["state"].as_str()),
        (Some("detached"), Some("source_authoritative")),
        "{v}"
    );
    assert_eq!(
        listed(state.path(), &src.dev),
        None,
        "a plain device is listed"
    );

    retire(&src, &tgt, 0x5eed);
    let v = status(&[]);
    assert_eq!(v["state"], "retired", "{v}");
    assert_eq!(v["marker"]["migration_id"], 0x5eed, "{v}");
    assert_eq!(v["saved_head"], serde_json::Value::Null, "{v}");
    let v = status(&["--target", &tgt.dev]);
    assert_eq!(v["state"], "interrupted_switch", "{v}");
    let e = listed(state.path(), &src.dev).unwrap_or_else(|| panic!("{} not listed", src.dev));
    assert_eq!(e["state"], "interrupted_switch", "{e}");
    assert_eq!(e["target"], tgt.dev.as_str(), "{e}");
    assert_eq!(e["status"]["state"], "interrupted_switch", "{e}");
    let o = migrate(&["list", "--state-dir", &sd]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.lines().any(|l| l.starts_with(&src.dev)
            && l.contains("interrupted_switch")
            && l.contains(&format!("migrate recover {} {}", src.dev, tgt.dev))),
        "{text}"
    );

    // The switch completed: the target's head is written.
    write_dev(&tgt.dev, &pattern(4096, 9));
    let e = listed(state.path(), &src.dev).unwrap_or_else(|| panic!("{} not listed", src.dev));
    assert_eq!(e["state"], "switched", "{e}");
}
