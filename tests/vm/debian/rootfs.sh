#!/usr/bin/env bash
# The Debian 12 root filesystem of the root-disk scenario, as a tarball built by mmdebstrap from
# Debian's packages (minbase, systemd, udev, e2fsprogs, util-linux and what the scenario's
# workload runs), through this machine's own apt sources. Cached by its inputs.
#
#   tests/vm/debian/rootfs.sh            build if needed; print the tarball's path on stdout
#   tests/vm/debian/rootfs.sh --key      print the cache key
#
# The key is the sha256 of this script (the package list, the suite, the options), the
# mmdebstrap version and the apt sources. The tarball is <cache>/debian-<key16>.tar and its
# package list (name, version) <cache>/debian-<key16>.manifest. SOURCE_DATE_EPOCH is fixed, so
# the same package versions give the same tarball. The build runs under
# flock(/tmp/blkmig-kbuild.lock) like the kernel's; the three most recent tarballs are kept.
set -euo pipefail

cache=${BLKMIG_CACHE:-/var/cache/blkmig}
lock=/tmp/blkmig-kbuild.lock
suite=bookworm
# What the image holds beyond minbase: PID 1 and udev, the tools the scenario checks with, kmod
# for the module package's depmod and systemd-modules-load, sqlite3 for the database writer.
packages=systemd,systemd-sysv,udev,dbus,e2fsprogs,util-linux,fdisk,kmod,sqlite3,procps
# Bump when a change here changes the tarball (comments need no bump).
recipe=1
export SOURCE_DATE_EPOCH=1735689600 # 2025-01-01T00:00:00Z

log() { printf 'debian-rootfs: %s\n' "$*" >&2; }
die() {
	log "error: $*"
	exit 1
}

command -v mmdebstrap >/dev/null || die "mmdebstrap is missing: run scripts/setup-toolchain.sh"
sources=()
for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
	[ -f "$f" ] && sources+=("$f")
done
[ ${#sources[@]} -gt 0 ] || die "no apt sources on this machine (/etc/apt/sources.list*)"

key=$({
	sha256sum <"$0"
	mmdebstrap --version
	cat "${sources[@]}"
	echo "recipe $recipe"
} | sha256sum | cut -c1-64)
out="$cache/debian-${key:0:16}.tar"
[ "${1:-}" = --key ] && {
	echo "$key"
	exit 0
}
[ -z "${1:-}" ] || die "usage: $0 [--key]"

if [ -f "$out" ]; then
	touch "$out"
	log "cached: $out"
	echo "$out"
	exit 0
fi
mkdir -p "$cache"
exec 9>"$lock"
log "waiting for $lock"
flock 9
if [ ! -f "$out" ]; then
	t0=$(date +%s)
	log "mmdebstrap $suite (minbase + $packages)"
	tmp="$cache/debian-tmp.$$.tar"
	trap 'rm -f "$tmp"' EXIT
	# The sources files are the chroot's sources too (its apt can see the same archive).
	mmdebstrap --variant=minbase --format=tar --include="$packages" \
		--customize-hook='chroot "$1" dpkg-query -W -f="\${Package} \${Version}\n" > "'"$out.manifest"'"' \
		"$suite" "$tmp" "${sources[@]}" >&2 || die "mmdebstrap failed"
	mv "$tmp" "$out"
	log "built $out ($(($(stat -c %s "$out") / 1048576)) MiB, $(wc -l <"$out.manifest") packages) in $(($(date +%s) - t0))s"
	# Keep the three most recently used tarballs.
	find "$cache" -maxdepth 1 -type f -name 'debian-????????????????.tar' -printf '%T@ %p\n' |
		sort -rn | tail -n +4 | cut -d' ' -f2- | while read -r old; do
		log "pruning $old"
		rm -f "$old" "$old.manifest"
	done
fi
echo "$out"
