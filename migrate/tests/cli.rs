//! The `migrate` binary under abuse: bad options, closed pipes, a full
//! disk, paths that are not block devices. On image files; nothing here
//! needs root or the kernel module.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use common::{check_json_lines, pattern};

fn migrate() -> Command {
    Command::new(env!("CARGO_BIN_EXE_migrate"))
}

fn run(args: &[&str]) -> Output {
    migrate()
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run migrate: {e}"))
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Waits for `child` at most `limit`; kills it and fails if it runs longer.
fn wait_at_most(child: &mut Child, limit: Duration, what: &str) -> ExitStatus {
    let t0 = Instant::now();
    loop {
        if let Some(st) = child.try_wait().unwrap_or_else(|e| panic!("{e}")) {
            return st;
        }
        if t0.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what}: still running after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Two image files: a patterned source of `size` bytes and an empty target.
struct Images {
    dir: tempfile::TempDir,
}

impl Images {
    fn new(size: usize) -> Self {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        fs::write(dir.path().join("src.img"), pattern(size, 11)).unwrap_or_else(|e| panic!("{e}"));
        fs::write(dir.path().join("tgt.img"), vec![0u8; size]).unwrap_or_else(|e| panic!("{e}"));
        Self { dir }
    }

    fn src(&self) -> PathBuf {
        self.dir.path().join("src.img")
    }

    fn tgt(&self) -> PathBuf {
        self.dir.path().join("tgt.img")
    }
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap_or_else(|| panic!("non-UTF-8 path"))
}

#[test]
fn sizes_take_units_in_either_case_and_decimals() {
    let im = Images::new(1 << 20);
    for size in ["1m", "64k", "0.5M", "512K"] {
        let o = run(&[
            "copy",
            s(&im.src()),
            s(&im.tgt()),
            "-q",
            "--region-size",
            size,
        ]);
        assert!(o.status.success(), "--region-size {size}: {}", stderr(&o));
    }
}

#[test]
fn a_zero_rate_limit_is_refused() {
    let im = Images::new(1 << 20);
    let mut child = migrate()
        .args([
            "copy",
            s(&im.src()),
            s(&im.tgt()),
            "-q",
            "--rate-limit",
            "0",
        ])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{e}"));
    let st = wait_at_most(&mut child, Duration::from_secs(10), "--rate-limit 0");
    let o = child.wait_with_output().unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(st.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("--rate-limit"), "{}", stderr(&o));
}

#[test]
fn a_zero_pause_budget_is_refused() {
    let im = Images::new(1 << 20);
    let o = run(&["start", s(&im.src()), s(&im.tgt()), "--max-pause", "0"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("--max-pause"), "{}", stderr(&o));
}

#[test]
fn the_hold_timeout_is_a_bounded_duration() {
    let im = Images::new(1 << 20);
    let (src, tgt) = (im.src(), im.tgt());
    for ok in [
        ["--hold-timeout", "800ms"],
        ["--hold-timeout", "5s"],
        ["--hold-timeout-ms", "800"],
    ] {
        let o = run(&["attach", s(&src), s(&tgt), ok[0], ok[1]]);
        // Accepted: it gets as far as looking at the (file) source, and
        // refuses that.
        assert_eq!(o.status.code(), Some(2), "{ok:?}: {}", stderr(&o));
        assert!(
            stderr(&o).contains("is not a block device"),
            "{}",
            stderr(&o)
        );
        assert!(!stderr(&o).contains("--hold-timeout"), "{}", stderr(&o));
    }
    for bad in ["61s", "0s", "fast"] {
        let o = run(&["attach", s(&src), s(&tgt), "--hold-timeout", bad]);
        assert_eq!(o.status.code(), Some(2), "{bad}: {}", stderr(&o));
        assert!(stderr(&o).contains("--hold-timeout"), "{}", stderr(&o));
    }
}

#[test]
fn live_commands_on_a_file_say_it_is_not_a_block_device() {
    let im = Images::new(1 << 20);
    for args in [
        vec!["status", s(&im.src())],
        vec!["abort", s(&im.src())],
        vec!["detach", s(&im.src())],
        vec!["start", s(&im.src()), s(&im.tgt())],
    ] {
        let o = run(&args);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains("is not a block device"), "{args:?}: {err}");
        assert!(!err.contains("kernel"), "{args:?}: {err}");
    }
}

#[test]
fn the_errno_is_printed_once() {
    let im = Images::new(1 << 20);
    let o = run(&["copy", "/nonexistent/disk.img", s(&im.tgt())]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert_eq!(err.matches("ENOENT").count(), 1, "{err}");
    assert!(!err.contains("os error"), "{err}");
    assert!(err.contains("No such file or directory"), "{err}");
}

/// Peak resident memory of a child, in bytes, after it exits.
fn exit_and_peak_rss(child: &Child) -> (i32, u64) {
    let pid = i32::try_from(child.id()).unwrap_or_else(|e| panic!("{e}"));
    let mut status = 0;
    // SAFETY: `rusage` is plain old data, valid when zeroed.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `status` and `usage` are valid for writes for the call; the
    // pid is our child's, not yet reaped (`Child::wait` is not called).
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    assert_eq!(r, pid, "wait4: {}", std::io::Error::last_os_error());
    let code = if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        -1
    };
    // ru_maxrss is in KiB.
    (code, u64::try_from(usage.ru_maxrss).unwrap_or(0) * 1024)
}

#[test]
#[expect(
    clippy::zombie_processes,
    reason = "reaped by wait4 in exit_and_peak_rss"
)]
fn buffers_never_exceed_the_device_or_the_memory_budget() {
    let im = Images::new(64 << 20);
    let child = migrate()
        .args([
            "copy",
            s(&im.src()),
            s(&im.tgt()),
            "-q",
            "--region-size",
            "1G",
        ])
        .args(["--queue-depth", "8"])
        .spawn()
        .unwrap_or_else(|e| panic!("{e}"));
    let (code, rss) = exit_and_peak_rss(&child);
    assert_eq!(code, 0);
    assert!(rss < 200 << 20, "peak RSS {rss} bytes for a 64 MiB image");
    assert_eq!(
        fs::read(im.src()).unwrap_or_default(),
        fs::read(im.tgt()).unwrap_or_default()
    );
}

#[test]
fn a_closed_pipe_on_stdout_is_an_error_not_a_panic() {
    let im = Images::new(8 << 20);
    let mut child = migrate()
        .args(["copy", s(&im.src()), s(&im.tgt()), "--json", "-i", "0.05"])
        .args(["--rate-limit", "16M"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{e}"));
    // `| head -0`: the reader goes away at once.
    drop(child.stdout.take());
    let st = wait_at_most(
        &mut child,
        Duration::from_secs(30),
        "copy into a closed pipe",
    );
    let o = child.wait_with_output().unwrap_or_else(|e| panic!("{e}"));
    let err = stderr(&o);
    assert_eq!(st.code(), Some(1), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(err.contains("standard output"), "{err}");
}

#[test]
fn a_full_stdout_is_an_error_not_a_panic() {
    let im = Images::new(1 << 20);
    let full = fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .unwrap_or_else(|e| panic!("/dev/full: {e}"));
    let o = migrate()
        .args(["copy", s(&im.src()), s(&im.tgt()), "--json"])
        .stdout(full)
        .output()
        .unwrap_or_else(|e| panic!("{e}"));
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(err.contains("No space left on device (ENOSPC)"), "{err}");
}

#[test]
fn log_lines_off_a_terminal_have_no_escapes() {
    let im = Images::new(1 << 20);
    let o = run(&["-v", "copy", s(&im.src()), s(&im.tgt())]);
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("copy starts"), "{err}");
    assert!(!err.contains('\x1b'), "{err:?}");
}

/// A pseudo-terminal for a child's stderr: the progress bar is drawn.
struct Pty {
    master: fs::File,
    slave: fs::File,
}

impl Pty {
    fn new() -> Self {
        use rustix::pty::{grantpt, openpt, ptsname, unlockpt, OpenptFlags};
        let master = openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY)
            .unwrap_or_else(|e| panic!("openpt: {e}"));
        grantpt(&master).unwrap_or_else(|e| panic!("grantpt: {e}"));
        unlockpt(&master).unwrap_or_else(|e| panic!("unlockpt: {e}"));
        let name = ptsname(&master, Vec::new()).unwrap_or_else(|e| panic!("ptsname: {e}"));
        let slave = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(name.to_string_lossy().as_ref())
            .unwrap_or_else(|e| panic!("pty slave: {e}"));
        Self {
            master: master.into(),
            slave,
        }
    }
}

#[test]
fn an_interrupted_copy_leaves_the_bar_where_it_stopped() {
    use std::io::Read;
    let im = Images::new(64 << 20);
    let pty = Pty::new();
    let mut child = migrate()
        .args(["copy", s(&im.src()), s(&im.tgt()), "--rate-limit", "4M"])
        .stderr(pty.slave.try_clone().unwrap_or_else(|e| panic!("{e}")))
        .spawn()
        .unwrap_or_else(|e| panic!("{e}"));
    drop(pty.slave);
    let mut master = pty.master;
    let reader = std::thread::spawn(move || {
        let mut out = Vec::new();
        // EIO once the child has exited and the slave is closed.
        let _ = master.read_to_end(&mut out);
        String::from_utf8_lossy(&out).into_owned()
    });
    std::thread::sleep(Duration::from_millis(1500));
    let pid = rustix::process::Pid::from_child(&child);
    rustix::process::kill_process(pid, rustix::process::Signal::INT)
        .unwrap_or_else(|e| panic!("kill: {e}"));
    let st = wait_at_most(&mut child, Duration::from_secs(20), "interrupted copy");
    let shown = reader.join().unwrap_or_else(|_| panic!("reader panicked"));
    assert_eq!(st.code(), Some(1), "{shown}");
    assert!(shown.contains("interrupted"), "{shown}");
    assert!(!shown.contains("done"), "{shown}");
    assert!(!shown.contains("100%"), "{shown}");
}

/// Runs `migrate rebalance` on a plan written from `json`, with `DIR`
/// standing for a scratch directory that holds two image files (and
/// would hold the plan's state directory). Returns its output, its stderr
/// with the scratch directory named `DIR` again, and whether the state
/// directory exists afterwards.
fn rebalance(json: &str) -> (Output, String, bool) {
    let im = Images::new(1 << 20);
    let dir = im.dir.path();
    let plan = dir.join("plan.json");
    fs::write(&plan, json.replace("DIR", s(dir))).unwrap_or_else(|e| panic!("{e}"));
    let o = run(&["rebalance", s(&plan)]);
    let err = stderr(&o).replace(s(dir), "DIR");
    (o, err, dir.join("state").exists())
}

#[test]
fn a_bad_plan_is_refused_whole_with_the_problem_named() {
    let pair = r#"{"source": "DIR/src.img", "target": "DIR/tgt.img"}"#;
    let cases = [
        (
            format!(r#"{{"concurrency": 2, "paralel": 3, "migrations": [{pair}]}}"#),
            "unknown field `paralel`",
        ),
        (
            format!(r#"{{"concurrency": 0, "migrations": [{pair}]}}"#),
            "concurrency: must be at least 1",
        ),
        (
            format!(r#"{{"options": {{"max_pause": "soon"}}, "migrations": [{pair}]}}"#),
            "options.max_pause: invalid duration \"soon\"",
        ),
        (
            format!(r#"{{"total_rate_limit": "0", "migrations": [{pair}]}}"#),
            "total_rate_limit: invalid rate",
        ),
        (
            r#"{"migrations": [{"source": "DIR/src.img", "target": "DIR/src.img"}]}"#.into(),
            "is both the source and the target of one migration",
        ),
        (
            format!(
                r#"{{"migrations": [{pair}, {{"source": "DIR/other.img", "target": "DIR/tgt.img"}}]}}"#
            ),
            "migrations[1].target: DIR/tgt.img is named again (it is migrations[0].target already)",
        ),
        (
            format!(
                r#"{{"migrations": [{pair}, {{"source": "DIR/missing.img", "target": "DIR/t2.img"}}]}}"#
            ),
            "migrations[1].source: cannot look up DIR/missing.img: No such file or directory (ENOENT)",
        ),
        (
            format!(r#"{{"state_dir": "DIR/state", "migrations": [{pair}]}}"#),
            "migrations[0].source: DIR/src.img is not a block device",
        ),
    ];
    for (plan, words) in cases {
        let (o, err, state) = rebalance(&plan);
        assert_eq!(o.status.code(), Some(2), "{plan}: {err}");
        assert!(err.contains(words), "{plan}\n  got: {err}\n  want: {words}");
        assert!(err.starts_with("migrate: the plan DIR/plan.json"), "{err}");
        assert!(o.stdout.is_empty(), "a refused plan printed a report");
        assert!(!state, "a refused plan created its state directory");
    }
}

#[test]
fn one_device_under_two_names_is_refused() {
    let im = Images::new(1 << 20);
    let dir = im.dir.path();
    std::os::unix::fs::symlink(im.src(), dir.join("alias.img")).unwrap_or_else(|e| panic!("{e}"));
    let plan = dir.join("plan.json");
    let json = format!(
        r#"{{"migrations": [{{"source": {:?}, "target": {:?}}}, {{"source": {:?}, "target": {:?}}}]}}"#,
        im.src(),
        im.tgt(),
        dir.join("alias.img"),
        dir.join("t2.img")
    );
    fs::write(&plan, json).unwrap_or_else(|e| panic!("{e}"));
    let o = run(&["rebalance", s(&plan), "--check"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.contains("migrations[1].source (and migrations[0].source)")
            && err.contains("is the same device as"),
        "{err}"
    );
}

#[test]
fn a_toml_plan_is_refused_with_the_format_named() {
    let im = Images::new(4096);
    let plan = im.dir.path().join("plan.toml");
    fs::write(&plan, "concurrency = 2\n").unwrap_or_else(|e| panic!("{e}"));
    let o = run(&["rebalance", s(&plan)]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("plans are JSON"), "{}", stderr(&o));
}

#[test]
fn a_usage_error_exits_2() {
    for args in [
        vec!["frobnicate"],
        vec!["status"],
        vec!["list", "--no-such-option"],
        vec!["copy", "a", "b", "--interval", "0"],
        vec!["rebalance", "plan.json", "-i", "-1"],
    ] {
        let o = run(&args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
        assert!(stderr(&o).contains("--help"), "{args:?}: {}", stderr(&o));
    }
}

#[test]
fn a_missing_device_exits_2_naming_it() {
    let im = Images::new(1 << 20);
    let gone = "/nonexistent/blkmig-disk";
    for args in [
        vec!["status", gone],
        vec!["status", gone, "--json"],
        vec!["start", gone, s(&im.tgt())],
        vec!["attach", gone, s(&im.tgt())],
        vec!["abort", gone],
        vec!["detach", gone],
        vec!["copy", gone, s(&im.tgt())],
        vec!["copy", s(&im.src()), gone],
        vec!["recover", gone, s(&im.tgt())],
    ] {
        let o = run(&args);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(gone), "{args:?}: {err}");
        assert!(err.contains("ENOENT"), "{args:?}: {err}");
        assert!(
            o.stdout.is_empty(),
            "{args:?}: {}",
            String::from_utf8_lossy(&o.stdout)
        );
    }
}

#[test]
fn the_exit_status_is_in_the_help() {
    let o = run(&["--help"]);
    let help = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success());
    for line in [
        "Exit status:",
        "0  success",
        "1  the operation failed",
        "2  usage error",
    ] {
        assert!(help.contains(line), "{help}");
    }
    assert!(
        !help.contains("assets"),
        "a packaging command in the help: {help}"
    );
}

#[test]
fn the_version_names_the_module_abi_and_the_kernel() {
    let o = run(&["--version"]);
    let v = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success());
    let want = format!(
        "migrate {} (module ABI {}, Linux 6.12",
        env!("CARGO_PKG_VERSION"),
        blkmig::core::abi::ABI_VERSION
    );
    assert!(v.starts_with(&want), "{v}");
}

#[test]
fn copy_json_is_as_documented() {
    let im = Images::new(4 << 20);
    let o = run(&[
        "copy",
        s(&im.src()),
        s(&im.tgt()),
        "--json",
        "--verify",
        "-i",
        "0.01",
        "--rate-limit",
        "40M",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let lines = check_json_lines(&["progress", "copy-done"], &o.stdout);
    assert!(lines.len() > 1, "no progress line");
    let last = &lines[lines.len() - 1];
    assert_eq!(last["event"], "done");
    assert_eq!(last["schema_version"], 1);
    assert_eq!(last["verified"], true);
    assert!(lines[..lines.len() - 1]
        .iter()
        .all(|l| l["event"] == "progress" && l["schema_version"] == 1));
}

#[test]
fn list_json_is_as_documented() {
    let state = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    for all in [false, true] {
        let mut args = vec!["list", "--json", "--state-dir", s(state.path())];
        if all {
            args.push("--all");
        }
        let o = run(&args);
        assert!(o.status.success(), "{}", stderr(&o));
        let lines = check_json_lines(&["list"], &o.stdout);
        assert_eq!(lines.len(), 1, "one object");
        assert!(lines[0]["devices"].is_array());
    }
}

#[test]
fn assets_are_the_man_pages_and_the_completions() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let o = run(&["assets", s(dir.path())]);
    assert!(o.status.success(), "{}", stderr(&o));
    let read =
        |p: &str| fs::read_to_string(dir.path().join(p)).unwrap_or_else(|e| panic!("{p}: {e}"));
    let subcommands = [
        "copy",
        "start",
        "abort",
        "rebalance",
        "attach",
        "detach",
        "list",
        "status",
        "recover",
    ];
    let man = read("man/migrate.1");
    assert!(
        man.starts_with(".ie") && man.contains(".TH migrate 1"),
        "{man}"
    );
    assert!(man.contains(".SH \"EXIT STATUS\""), "{man}");
    assert!(man.contains("2  usage error, or input refused"), "{man}");
    assert!(man.contains("module ABI"), "{man}");
    for sub in subcommands {
        assert!(
            man.contains(&format!("migrate\\-{sub}(1)")),
            "{sub} not in {man}"
        );
        let page = read(&format!("man/migrate-{sub}.1"));
        assert!(page.contains(".SH SYNOPSIS"), "{sub}: {page}");
    }
    assert!(read("man/migrate-start.1").contains("max\\-pause"));
    assert!(!dir.path().join("man/migrate-assets.1").exists());
    let bash = read("completions/migrate.bash");
    assert!(bash.contains("--max-pause"), "{bash}");
    assert!(bash.contains("complete -F _migrate"), "{bash}");
    let zsh = read("completions/_migrate");
    assert!(zsh.starts_with("#compdef migrate"), "{zsh}");
    assert!(zsh.contains("--max-pause"), "{zsh}");
    let fish = read("completions/migrate.fish");
    assert!(fish.contains("-l max-pause"), "{fish}");
    for c in [&bash, &zsh, &fish] {
        assert!(!c.contains("assets"), "a packaging command in a completion");
        for sub in subcommands {
            assert!(c.contains(sub), "{sub} not in a completion");
        }
    }
}
