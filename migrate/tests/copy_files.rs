//! `migrate copy` on image files: the copy is exact, checks refuse bad
//! input without touching anything, sparse and verify do what they say.

mod common;

use common::pattern;

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use blkmig::copy::{self, CopyOptions};
use blkmig::device::{Access, Device, Probe};
use blkmig::error::Error;
use blkmig::progress::Progress;
use blkmig::units::Bytes;

fn migrate(args: &[&dyn AsRef<std::ffi::OsStr>]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_migrate"));
    for a in args {
        c.arg(a);
    }
    c.output()
        .unwrap_or_else(|e| panic!("cannot run migrate: {e}"))
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn image(dir: &Path, name: &str, data: &[u8]) -> PathBuf {
    let p = dir.join(name);
    fs::write(&p, data).unwrap_or_else(|e| panic!("write {}: {e}", p.display()));
    p
}

fn read(p: &Path) -> Vec<u8> {
    fs::read(p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
}

#[test]
fn copies_exactly_with_odd_sizes_and_a_short_last_region() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    // 3 MiB + 12 KiB: the last 1 MiB region is short.
    let data = pattern((3 << 20) + (12 << 10), 1);
    let src = image(dir.path(), "src.img", &data);
    let tgt = image(dir.path(), "tgt.img", &pattern(4 << 20, 2));
    let o = migrate(&[
        &"copy",
        &src,
        &tgt,
        &"--verify",
        &"--queue-depth",
        &"3",
        &"--region-size",
        &"1M",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = read(&tgt);
    assert_eq!(&out[..data.len()], &data[..], "copied bytes differ");
    assert_eq!(
        out[data.len()..],
        pattern(4 << 20, 2)[data.len()..],
        "bytes past the source's end changed"
    );
    assert!(stderr(&o).contains("verified 4 regions"), "{}", stderr(&o));
}

#[test]
fn every_region_size_and_depth_copies_exactly() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let data = pattern(1 << 20, 3);
    let src = image(dir.path(), "src.img", &data);
    for (region, depth) in [("4K", "1"), ("64K", "8"), ("1M", "2"), ("8M", "4")] {
        let tgt = image(dir.path(), "tgt.img", &vec![0xAA; 1 << 20]);
        let o = migrate(&[
            &"copy",
            &src,
            &tgt,
            &"--region-size",
            &region,
            &"--queue-depth",
            &depth,
            &"-q",
        ]);
        assert!(o.status.success(), "region {region}: {}", stderr(&o));
        assert!(
            read(&tgt) == data,
            "region {region} depth {depth}: copy differs"
        );
    }
}

/// Each refusal names the problem, exits non-zero, and leaves the target
/// exactly as it was.
#[test]
fn refusals_change_nothing() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let src = image(dir.path(), "src.img", &pattern(2 << 20, 4));
    let small = image(dir.path(), "small.img", &pattern(1 << 20, 5));
    let tgt = image(dir.path(), "tgt.img", &pattern(2 << 20, 6));
    let odd = image(dir.path(), "odd.img", &pattern((1 << 20) + 100, 7));
    let link = dir.path().join("link.img");
    fs::hard_link(&src, &link).unwrap_or_else(|e| panic!("{e}"));
    let missing = dir.path().join("missing.img");
    let dirpath = dir.path().to_owned();
    let before = (read(&src), read(&small), read(&tgt));
    let cases: Vec<(Vec<&dyn AsRef<std::ffi::OsStr>>, &str)> = vec![
        (vec![&"copy", &src, &small], "is too small"),
        (vec![&"copy", &src, &src], "is the same device as"),
        (vec![&"copy", &src, &link], "is the same device as"),
        (vec![&"copy", &missing, &tgt], "No such file or directory"),
        (vec![&"copy", &src, &missing], "No such file or directory"),
        (
            vec![&"copy", &src, &dirpath],
            "is not a block device or a regular file",
        ),
        (
            vec![&"copy", &"/dev/null", &tgt],
            "is not a block device or a regular file",
        ),
        (vec![&"copy", &odd, &tgt], "not a multiple of its"),
        (
            vec![&"copy", &src, &tgt, &"--region-size", &"3000"],
            "cannot use a region size",
        ),
        (
            vec![&"copy", &src, &tgt, &"--region-size", &"2G"],
            "cannot use a region size",
        ),
        (
            vec![&"copy", &src, &tgt, &"--rate-limit", &"fast"],
            "invalid size",
        ),
        (
            vec![&"copy", &src, &tgt, &"--queue-depth", &"0"],
            "queue-depth",
        ),
    ];
    for (args, want) in cases {
        let o = migrate(&args);
        assert!(!o.status.success(), "{want}: exit status was success");
        assert!(
            stderr(&o).contains(want),
            "expected {want:?} in: {}",
            stderr(&o)
        );
        assert!(!missing.exists(), "a missing path was created");
    }
    assert!(
        (read(&src), read(&small), read(&tgt)) == before,
        "a refused copy changed a file"
    );
}

#[test]
fn sparse_copy_punches_holes_and_reads_back_exactly() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    // 8 MiB: data in regions 0 and 5, zeros elsewhere.
    let mut data = vec![0u8; 8 << 20];
    data[..1 << 20].copy_from_slice(&pattern(1 << 20, 8));
    data[5 << 20..6 << 20].copy_from_slice(&pattern(1 << 20, 9));
    let src = image(dir.path(), "src.img", &data);
    let tgt = image(dir.path(), "tgt.img", &pattern(8 << 20, 10));
    let o = migrate(&[
        &"copy",
        &src,
        &tgt,
        &"--sparse",
        &"--verify",
        &"--json",
        &"--region-size",
        &"1M",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(read(&tgt) == data, "sparse copy reads back differently");
    let done = String::from_utf8_lossy(&o.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["event"] == "done")
        .unwrap_or_else(|| panic!("no done event in {:?}", o.stdout));
    assert_eq!(done["bytes_written"], 2 << 20);
    assert_eq!(done["bytes_zeroed"], 6 << 20);
    assert_eq!(done["verified"], true);
    // The zeroed regions are holes: far fewer blocks allocated than 8 MiB.
    let blocks = fs::metadata(&tgt)
        .unwrap_or_else(|e| panic!("{e}"))
        .blocks();
    assert!(blocks * 512 <= 3 << 20, "{} bytes allocated", blocks * 512);
}

#[test]
fn json_progress_is_one_object_per_line() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let src = image(dir.path(), "src.img", &pattern(4 << 20, 11));
    let tgt = image(dir.path(), "tgt.img", &vec![0; 4 << 20]);
    let o = migrate(&[
        &"copy",
        &src,
        &tgt,
        &"--json",
        &"--rate-limit",
        &"8M",
        &"-i",
        &"0.1",
        // Small regions: the limit paces 16 of them, so progress is seen.
        &"--region-size",
        &"256K",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let events: Vec<serde_json::Value> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l:?}: {e}")))
        .collect();
    let progress: Vec<_> = events.iter().filter(|e| e["event"] == "progress").collect();
    assert!(
        progress.len() >= 2,
        "expected several progress lines, got {events:?}"
    );
    let done: Vec<u64> = progress
        .iter()
        .map(|e| e["bytes_done"].as_u64().unwrap_or(0))
        .collect();
    assert!(
        done.windows(2).all(|w| w[0] <= w[1]),
        "progress went backwards: {done:?}"
    );
    assert_eq!(
        progress.last().map(|e| e["bytes_done"].clone()),
        Some((4u64 << 20).into())
    );
    assert_eq!(
        events.last().map(|e| e["event"].clone()),
        Some("done".into())
    );
}

#[test]
fn plain_progress_off_a_terminal_uses_newlines() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let src = image(dir.path(), "src.img", &pattern(2 << 20, 12));
    let tgt = image(dir.path(), "tgt.img", &vec![0; 2 << 20]);
    let o = migrate(&[&"copy", &src, &tgt, &"--rate-limit", &"8M", &"-i", &"0.1"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(
        !err.contains('\r'),
        "carriage return off a terminal: {err:?}"
    );
    assert!(
        err.lines()
            .any(|l| l.starts_with("copy: 2.0 MiB / 2.0 MiB (100.0%)")),
        "{err}"
    );
}

#[tokio::test]
async fn verify_reports_the_region_that_differs() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let src = image(dir.path(), "src.img", &pattern(4 << 20, 13));
    let tgt = image(dir.path(), "tgt.img", &vec![0; 4 << 20]);
    let open = |p: &Path, write| {
        let probe = Probe::new(p).unwrap_or_else(|e| panic!("{e}"));
        Arc::new(
            Device::open(
                &probe,
                Access {
                    write,
                    direct: true,
                    exclusive: true,
                },
            )
            .unwrap_or_else(|e| panic!("{e}")),
        )
    };
    let (s, t) = (open(&src, false), open(&tgt, true));
    let cancel = Arc::new(AtomicBool::new(false));
    let opts = CopyOptions::default();
    let report = copy::copy(
        s.clone(),
        t.clone(),
        &opts,
        Progress::new("copy", 4 << 20),
        cancel.clone(),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(report.checksums.len(), 4);
    // Corrupt one byte of region 2 behind the copier's back.
    let mut bad = read(&tgt);
    bad[(2 << 20) + 17] ^= 1;
    fs::write(&tgt, &bad).unwrap_or_else(|e| panic!("{e}"));
    let res = copy::verify(
        s,
        t,
        Bytes(1 << 20),
        Arc::new(report.checksums),
        4,
        Progress::new("verify", 4 << 20),
        cancel,
    )
    .await;
    match res {
        Err(Error::Mismatch {
            region: 2, offset, ..
        }) => assert_eq!(offset, 2 << 20),
        other => panic!("expected a mismatch in region 2, got {other:?}"),
    }
}

#[test]
fn ctrl_c_stops_a_copy_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let src = image(dir.path(), "src.img", &pattern(8 << 20, 14));
    let tgt = image(dir.path(), "tgt.img", &vec![0; 8 << 20]);
    let child = Command::new(env!("CARGO_BIN_EXE_migrate"))
        .args(["copy", "-q", "--rate-limit", "1M"])
        .arg(&src)
        .arg(&tgt)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{e}"));
    std::thread::sleep(std::time::Duration::from_millis(500));
    rustix::process::kill_process(
        rustix::process::Pid::from_child(&child),
        rustix::process::Signal::INT,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let o = child.wait_with_output().unwrap_or_else(|e| panic!("{e}"));
    assert!(!o.status.success(), "an interrupted copy exited 0");
    assert!(stderr(&o).contains("interrupted"), "{}", stderr(&o));
}
