#!/usr/bin/env bash
# Everything a "# image: debian" VM scenario boots, in OUTDIR: blkmig's Debian packages
# (scripts/package.sh), the Debian 12 root filesystem (rootfs.sh, cached), the probe package the
# scenario installs with apt-get, and the disk (mkdisk.sh) with the scenario runner, its unit,
# tests/vm/*.sh and the test tools. Writes OUTDIR/boot.env:
#   DEBIAN_DISK=<disk image>  DEBIAN_KERNEL=<the packaged kernel>  DEBIAN_APPEND=<command line>
#
#   tests/vm/debian/build.sh OUTDIR
set -euo pipefail

repo=$(cd "$(dirname "$0")/../../.." && pwd)
here="$repo/tests/vm/debian"
log() { printf 'debian-build: %s\n' "$*" >&2; }
die() {
	log "error: $*"
	exit 1
}
[ $# = 1 ] || die "usage: $0 OUTDIR"
out=$1
mkdir -p "$out"
now() { date +%s; }

t=$(now)
mapfile -t debs < <("$repo/scripts/package.sh")
[ ${#debs[@]} -ge 4 ] || die "scripts/package.sh made ${#debs[@]} package(s): ${debs[*]}"
log "packages: $(($(now) - t))s: ${debs[*]##*/}"
t=$(now)
rootfs=$("$here/rootfs.sh")
log "root filesystem: $(($(now) - t))s: $rootfs"

# The test tools: stampwriter (the writer, its checker and `jsondoc`, the JSON checker), for
# Debian's glibc (this machine's).
(cd "$repo" && cargo build --release --locked -p blkmig-testtools) >&2
files=("$repo/target/release/stampwriter:/usr/local/bin/stampwriter")
files+=(
	"$here/blkmig-scenario:/usr/local/sbin/blkmig-scenario"
	"$here/blkmig-scenario.service:/etc/systemd/system/blkmig-scenario.service"
	"$repo/tests/vm/lib.sh:/tests/lib.sh"
	"$repo/tests/vm/live-lib.sh:/tests/live-lib.sh"
)
for s in "$repo"/tests/vm/scenarios/*.sh; do
	grep -q '^# image: debian$' "$s" && files+=("$s:/tests/scenarios/$(basename "$s")")
done

# The probe: a package of 32 files of 256 KiB (fixed pseudo-random content) with no
# dependencies, for `apt-get install` on the disk that moves.
probe="$out/probe"
rm -rf "$probe"
mkdir -p "$probe/DEBIAN" "$probe/usr/share/blkmig-probe"
python3 - "$probe/usr/share/blkmig-probe" <<'PY'
import random, sys
for i in range(32):
    r = random.Random(i)
    with open(f"{sys.argv[1]}/data-{i:02d}", "wb") as f:
        f.write(r.randbytes(256 * 1024))
PY
cat >"$probe/DEBIAN/control" <<CONTROL
Package: blkmig-probe
Version: 1.0
Architecture: all
Maintainer: blkmig developers <blkmig@example.invalid>
Description: blkmig test payload installed by apt-get during a migration
 32 files of fixed pseudo-random content.
CONTROL
find "$probe" -exec touch -h -d @1735689600 {} +
dpkg-deb --root-owner-group -Zxz --build "$probe" "$out/blkmig-probe_1.0_all.deb" >&2
files+=("$out/blkmig-probe_1.0_all.deb:/root/blkmig-probe_1.0_all.deb")

t=$(now)
"$here/mkdisk.sh" "$out/disk.img" "$rootfs" 1G "${debs[@]}" -- "${files[@]}" >"$out/mkdisk.out"
kernel=$(sed -n 's/^KERNEL=//p' "$out/mkdisk.out")
append=$(sed -n 's/^APPEND=//p' "$out/mkdisk.out")
[ -f "$kernel" ] && [ -n "$append" ] || die "mkdisk.sh gave no kernel or command line"
log "disk: $(($(now) - t))s: $out/disk.img, kernel $kernel"
{
	printf 'DEBIAN_DISK=%q\n' "$out/disk.img"
	printf 'DEBIAN_KERNEL=%q\n' "$kernel"
	printf 'DEBIAN_APPEND=%q\n' "$append"
} >"$out/boot.env"
