#!/usr/bin/env bash
# Build blkmig's Debian packages into target/packages/ and print their paths on stdout:
#
#   linux-image-<release>, linux-headers-<release>   the project's kernel (Linux 6.12 + the
#       filter series, kmod/kernel.config + tests/vm/kernel-vm.config), by the kernel's own
#       `make bindeb-pkg` on the cached tree of scripts/build-kernel.sh. <release> is
#       6.12.N-blkmig (CONFIG_LOCALVERSION): the package never replaces a distribution kernel.
#   blkmig-module-<release>   blkmig.ko in /lib/modules/<release>/extra, depmod on install and
#       removal, loaded at boot (/usr/lib/modules-load.d/blkmig.conf); Provides: blkmig-module.
#   blkmig                    `migrate` in /usr/sbin, its man pages, bash/zsh/fish completions
#       and docs (cargo-deb, metadata in migrate/Cargo.toml).
#
#   scripts/package.sh                     all three, for the project's kernel configuration
#   scripts/package.sh --host-config FILE  all three, for a host: its own kernel configuration
#                                          (e.g. /boot/config-$(uname -r)) with
#                                          kmod/host-kernel.config over it (docs/install.md)
#   scripts/package.sh --key               print the kernel packages' cache key
#
# The kernel packages are cached beside the kernel tree (<cache>/kernel-<key16>.debs/), keyed by
# the tree and the recipe below; the other two are rebuilt each time (seconds, incremental).
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
cache=${BLKMIG_CACHE:-/var/cache/blkmig}
out="$repo/target/packages"
# Bump when a change here changes the kernel packages (comments need no bump).
recipe=1
version=$(sed -n 's/^version = "\(.*\)"/\1/p' "$repo/Cargo.toml" | head -n1)

log() { printf 'package: %s\n' "$*" >&2; }
die() {
	log "error: $*"
	exit 1
}
now() { date +%s; }

[ -n "$version" ] || die "no workspace version in Cargo.toml"
usage="usage: $0 [--host-config FILE] [--key]"
want_key=0
while [ $# -gt 0 ]; do
	case "$1" in
	--host-config)
		[ $# -ge 2 ] || die "$usage"
		[ -f "$2" ] || die "--host-config $2: no such file"
		grep -q '^CONFIG_X86_64=y' "$2" || die "--host-config $2 is not an x86_64 kernel configuration"
		export BLKMIG_KERNEL_VARIANT=host BLKMIG_HOST_CONFIG
		BLKMIG_HOST_CONFIG=$(realpath "$2")
		shift 2
		;;
	--key) want_key=1 && shift ;;
	*) die "$usage" ;;
	esac
done
kkey=$("$repo/scripts/build-kernel.sh" --key)
if [ $want_key = 1 ]; then
	printf 'kernel %s recipe %s\n' "$kkey" "$recipe" | sha256sum | cut -c1-64
	exit 0
fi
for t in dpkg-deb dpkg-buildpackage; do
	command -v "$t" >/dev/null || die "$t is missing: run scripts/setup-toolchain.sh"
done
cargo_deb="$repo/target/tools/bin/cargo-deb"
[ -x "$cargo_deb" ] || die "$cargo_deb is missing: run scripts/setup-toolchain.sh"

rm -rf "$out"
mkdir -p "$out"

# --- the kernel ------------------------------------------------------------------------------
t=$(now)
kdir=$("$repo/scripts/build-kernel.sh")
release=$(cat "$kdir/include/config/kernel.release")
case "$release" in *-blkmig) ;; *) die "kernel release $release does not end in -blkmig" ;; esac
debs="$kdir.debs"
pkey=$(printf 'kernel %s recipe %s\n' "$kkey" "$recipe" | sha256sum | cut -c1-64)
if [ ! -f "$debs/.key" ] || [ "$(cat "$debs/.key")" != "$pkey" ]; then
	log "kernel packages for $release: make bindeb-pkg (log: $kdir.debs.log)"
	rm -rf "$debs"
	# bindeb-pkg writes its packages into the tree's parent directory; a directory of their own
	# keeps them apart from other trees' and from a half-finished run.
	staging=$(mktemp -d "$cache/debs.XXXXXX")
	trap 'rm -rf "$staging"' EXIT
	"$repo/scripts/build-kernel.sh" --make bindeb-pkg \
		"KDEB_PKGVERSION=${release%-blkmig}-blkmig$recipe" KDEB_SOURCENAME=linux-blkmig \
		>"$kdir.debs.log" 2>&1 || {
		tail -n 30 "$kdir.debs.log" >&2
		die "make bindeb-pkg failed"
	}
	mkdir -p "$staging/debs"
	# The kernel's own linux-libc-dev would replace the distribution's: not ours to ship.
	for f in "$cache"/linux-image-"$release"_*.deb "$cache"/linux-headers-"$release"_*.deb; do
		[ -f "$f" ] || die "bindeb-pkg made no $(basename "$f")"
		mv "$f" "$staging/debs/"
	done
	rm -f "$cache"/linux-libc-dev_*.deb "$cache"/linux-image-"$release"-dbg_*.deb \
		"$cache"/linux-blkmig_*.buildinfo "$cache"/linux-blkmig_*.changes
	echo "$pkey" >"$staging/debs/.key"
	mv "$staging/debs" "$debs"
	log "kernel packages: $(($(now) - t))s"
else
	log "kernel packages: cached ($debs)"
fi
cp "$debs"/*.deb "$out/"

# --- the module ------------------------------------------------------------------------------
ko=$(BLKMIG_KERNEL_TREE=$kdir "$repo/scripts/build-module.sh")
vermagic=$(modinfo -F vermagic "$ko")
case "$vermagic" in "$release "*) ;; *) die "$ko is for '$vermagic', not $release" ;; esac
pkg="blkmig-module-$release"
root=$(mktemp -d)
chmod 0755 "$root"
trap 'rm -rf "$root" ${staging:+"$staging"}' EXIT
install -D -m 0644 "$ko" "$root/lib/modules/$release/extra/blkmig.ko"
install -D -m 0644 /dev/stdin "$root/usr/lib/modules-load.d/blkmig.conf" <<CONF
# Load the blkmig block-device filter at boot, so that \`migrate\` finds it.
blkmig
CONF
install -D -m 0644 "$repo/LICENSE" "$root/usr/share/doc/$pkg/copyright"
mkdir -p "$root/DEBIAN"
cat >"$root/DEBIAN/control" <<CONTROL
Package: $pkg
Version: $version
Architecture: amd64
Maintainer: blkmig developers <blkmig@example.invalid>
Depends: linux-image-$release
Provides: blkmig-module
Section: kernel
Priority: optional
Description: blkmig block-device filter module for Linux $release
 The kernel half of blkmig, live migration of a block device to another
 one: a filter on the kernel's block-device filter hook that mirrors writes
 while \`migrate\` copies, then redirects every I/O to the new device.
 Built for the kernel of the package linux-image-$release.
CONTROL
for script in postinst postrm; do
	cat >"$root/DEBIAN/$script" <<SCRIPT
#!/bin/sh
set -e
# The module's dependency list for its kernel (only when that kernel is installed).
if [ -d /lib/modules/$release/kernel ] || [ -d /lib/modules/$release/extra ]; then
	depmod -a $release
fi
SCRIPT
	chmod 0755 "$root/DEBIAN/$script"
done
dpkg-deb --root-owner-group -Zxz --build "$root" "$out/${pkg}_${version}_amd64.deb" >&2

# --- migrate ---------------------------------------------------------------------------------
t=$(now)
(cd "$repo" && cargo build --release --locked -p migrate --bin migrate) >&2
"$repo/target/release/migrate" assets "$repo/target/assets" >&2
(cd "$repo" && "$cargo_deb" -p migrate --no-build --output "$out/") >&2
log "migrate package: $(($(now) - t))s"

ls "$out"/*.deb
