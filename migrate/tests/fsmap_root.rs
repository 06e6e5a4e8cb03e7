//! The free space of a real mounted ext4 (`FS_IOC_GETFSMAP`), on a loop
//! device.
//!
//! Root tier: runs only with `BLKMIG_ROOT_TESTS=1` (as root) and then fails
//! rather than skips when it cannot do its work. The loop device and the
//! mount are undone on drop.

mod common;

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::path::PathBuf;
use std::process::Command;

use blkmig::fsmap::{covers, FreeSpace, Fsmap};
use common::{enabled, pattern, run};

/// An ext4 on a loop device, mounted; unmounted and detached on drop.
struct Ext4 {
    dev: String,
    file: PathBuf,
    mnt: tempfile::TempDir,
    mounted: bool,
    _dir: tempfile::TempDir,
}

impl Ext4 {
    fn new(bytes: u64) -> Self {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let file: PathBuf = dir.path().join("disk.img");
        let f = fs::File::create(&file).unwrap_or_else(|e| panic!("{e}"));
        f.set_len(bytes).unwrap_or_else(|e| panic!("{e}"));
        let dev = run("losetup", &["--find", "--show", &file.to_string_lossy()]);
        let mnt = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let mut me = Self {
            dev,
            file,
            mnt,
            mounted: false,
            _dir: dir,
        };
        run("mkfs.ext4", &["-q", "-F", "-b", "4096", &me.dev]);
        run("mount", &[&me.dev, &me.mnt.path().to_string_lossy()]);
        me.mounted = true;
        me
    }

    fn umount(&mut self) {
        if self.mounted {
            run("umount", &[&self.mnt.path().to_string_lossy()]);
            self.mounted = false;
        }
    }
}

impl Drop for Ext4 {
    fn drop(&mut self) {
        if self.mounted {
            let _ = Command::new("umount").arg(self.mnt.path()).status();
        }
        let _ = Command::new("losetup").args(["-d", &self.dev]).status();
    }
}

/// The free space fsmap reports excludes every block of a file's data, and
/// adds up to what statfs counts free; unmounted, the device has no free
/// space source (a full copy).
#[test]
fn free_space_of_a_mounted_ext4_excludes_its_files() {
    if !enabled() {
        return;
    }
    const SIZE: u64 = 64 << 20;
    let mut fs4 = Ext4::new(SIZE);
    let data = pattern(8 << 20, 7);
    {
        let mut f = fs::File::create(fs4.mnt.path().join("data")).unwrap_or_else(|e| panic!("{e}"));
        f.write_all(&data).unwrap_or_else(|e| panic!("{e}"));
        f.sync_all().unwrap_or_else(|e| panic!("{e}"));
    }
    let m = Fsmap::for_source(std::path::Path::new(&fs4.dev))
        .unwrap_or_else(|| panic!("no free-space source for the mounted {}", fs4.dev));
    m.settle().unwrap_or_else(|e| panic!("syncfs: {e}"));
    let free = m
        .free((0, SIZE))
        .unwrap_or_else(|e| panic!("GETFSMAP: {e}"));
    assert!(
        free.windows(2).all(|w| w[0].1 <= w[1].0),
        "not sorted and disjoint: {free:?}"
    );
    let total: u64 = free.iter().map(|(s, e)| e - s).sum();
    let st = rustix::fs::statvfs(fs4.mnt.path()).unwrap_or_else(|e| panic!("{e}"));
    let statfs_free = st.f_bfree * st.f_frsize;
    assert_eq!(total, statfs_free, "fsmap's free bytes vs statfs's");
    assert!(total > 40 << 20 && total < SIZE - (8 << 20), "{total}");
    // A query over part of the device is clipped to it.
    let part = m
        .free((10 << 20, 20 << 20))
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        part.iter()
            .all(|&(s, e)| s >= 10 << 20 && e <= 20 << 20 && s < e),
        "{part:?}"
    );

    // Where every 4 KiB block of the file is on the device: none is free.
    let blocks: HashMap<&[u8], usize> =
        data.chunks(4096).enumerate().map(|(i, b)| (b, i)).collect();
    // The backing file: what the loop device wrote (its own page cache
    // may hold what mkfs left).
    let dev = fs::read(&fs4.file).unwrap_or_else(|e| panic!("{e}"));
    let mut found = 0;
    for (k, b) in dev.chunks(4096).enumerate() {
        if blocks.contains_key(b) {
            found += 1;
            let at = k as u64 * 4096;
            assert!(
                !covers(&free, (at, at + 4096)),
                "the file's block at {at} is reported free"
            );
        }
    }
    assert_eq!(
        found,
        blocks.len(),
        "not every block of the file found on the device"
    );

    drop(m);
    fs4.umount();
    assert!(
        Fsmap::for_source(std::path::Path::new(&fs4.dev)).is_none(),
        "an unmounted device has a free-space source"
    );
}
