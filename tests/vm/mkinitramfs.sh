#!/usr/bin/env bash
# Build the initramfs the VM tests boot: busybox-static, e2fsprogs (with their libraries),
# /etc/passwd with root and an unprivileged user (uid 1000), blkmig.ko, the static `migrate`
# binary, the static `stampwriter` (tests/tools, for the live-* scenarios), tests/vm/lib.sh,
# tests/vm/live-lib.sh, tests/vm/scenarios/*.sh and tests/vm/init as /init.
#
#   tests/vm/mkinitramfs.sh OUT.cpio.gz [--module KO|none] [--migrate BIN|none] [--stampwriter BIN|none]
#                           [--tool NAME]...
#
# Defaults: --module kmod/blkmig.ko, --migrate target/x86_64-unknown-linux-gnu/release/migrate.
# `none` leaves the file out (scenarios that need it then fail in the guest).
# Without --stampwriter, when migrate is included, stampwriter is built here (static, like
# migrate: cargo -p blkmig-testtools) and included; if that build fails it is left out.
# --tool NAME (repeatable): one more host binary (found on the PATH) in /usr/sbin, with its
# libraries, like e2fsprogs; for the benchmarks' guests (e.g. lvm and mdadm for bench/peers-vm.sh).
# The scenario to run is chosen at boot time (kernel command line), so one image serves all.
set -euo pipefail

repo=$(cd "$(dirname "$0")/../.." && pwd)
vm="$repo/tests/vm"
log() { printf 'mkinitramfs: %s\n' "$*" >&2; }
die() {
	log "error: $*"
	exit 1
}

[ $# -ge 1 ] || die "usage: $0 OUT.cpio.gz [--module KO|none] [--migrate BIN|none]"
out=$1
shift
module="$repo/kmod/blkmig.ko"
migrate="$repo/target/x86_64-unknown-linux-gnu/release/migrate"
stampwriter=auto
tools=()
while [ $# -gt 0 ]; do
	case "$1" in
	--module) module=$2; shift 2 ;;
	--migrate) migrate=$2; shift 2 ;;
	--stampwriter) stampwriter=$2; shift 2 ;;
	--tool) tools+=("$2"); shift 2 ;;
	*) die "unknown argument $1" ;;
	esac
done

if [ "$module" != none ] && [ ! -f "$module" ]; then
	die "module $module does not exist: build it with scripts/build-module.sh (or pass --module none)"
fi
if [ "$migrate" != none ]; then
	[ -f "$migrate" ] || die "migrate binary $migrate does not exist yet: build it with
  RUSTFLAGS=\"-C target-feature=+crt-static\" cargo build --release --target x86_64-unknown-linux-gnu -p migrate --bins
(or pass --migrate none)"
	if readelf -l "$migrate" 2>/dev/null | grep -q 'Requesting program interpreter'; then
		die "$migrate is dynamically linked; build it with RUSTFLAGS=\"-C target-feature=+crt-static\""
	fi
fi
if [ "$stampwriter" = auto ]; then
	stampwriter=none
	if [ "$migrate" != none ]; then
		if (cd "$repo" && RUSTFLAGS="-C target-feature=+crt-static" cargo build -q --release \
			--target x86_64-unknown-linux-gnu -p blkmig-testtools) >&2; then
			stampwriter="$repo/target/x86_64-unknown-linux-gnu/release/stampwriter"
		else
			log "warning: the static stampwriter did not build; the live-* scenarios will fail"
		fi
	fi
fi
[ "$stampwriter" = none ] || [ -f "$stampwriter" ] || die "stampwriter binary $stampwriter does not exist"
busybox=$(command -v busybox) || die "busybox-static is not installed: run scripts/setup-toolchain.sh"
readelf -l "$busybox" | grep -q 'Requesting program interpreter' && die "$busybox is not static (install busybox-static)"

root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
chmod 0755 "$root"
mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,etc,proc,sys,dev,tmp,mnt,root,home/user,lib64,tests/scenarios}
chmod 1777 "$root/tmp"

# busybox and its applets
cp "$busybox" "$root/bin/busybox"
"$busybox" --list-full | while read -r applet; do
	[ -e "$root/$applet" ] || ln -s /bin/busybox "$root/$applet"
done

# Debian binaries (dynamically linked): copy them and every library ldd lists, plus the loader.
copy_with_libs() {
	local bin=$1 dest=$2 lib
	cp -L "$bin" "$root$dest"
	for lib in $(ldd "$bin" | grep -oE '/[^ ]+'); do
		mkdir -p "$root$(dirname "$lib")"
		[ -e "$root$lib" ] || cp -L "$lib" "$root$lib"
	done
}
for tool in mke2fs e2fsck blkid dumpe2fs sfdisk wipefs dmsetup resizepart; do
	p=$(command -v "$tool" 2>/dev/null) ||
		die "$tool not found (run scripts/setup-toolchain.sh: e2fsprogs, dmsetup, util-linux, fdisk)"
	rm -f "$root/usr/sbin/$tool" "$root/sbin/$tool"
	copy_with_libs "$p" "/usr/sbin/$tool"
done
for alias in mkfs.ext4:mke2fs fsck.ext4:e2fsck; do
	rm -f "$root/sbin/${alias%%:*}" "$root/usr/sbin/${alias%%:*}"
	ln -s "${alias#*:}" "$root/usr/sbin/${alias%%:*}"
done
for tool in "${tools[@]}"; do
	p=$(command -v "$tool" 2>/dev/null) || die "--tool $tool: not found on the PATH"
	copy_with_libs "$p" "/usr/sbin/$tool"
done
[ -f /etc/mke2fs.conf ] && cp /etc/mke2fs.conf "$root/etc/"
# The remote-nbd* scenarios serve a disk over NBD inside the guest. Optional: without them
# only those scenarios fail, naming the missing tool.
for tool in nbd-server nbd-client; do
	p=$(command -v "$tool" 2>/dev/null) || {
		log "warning: $tool not found (scripts/setup-toolchain.sh installs it); the remote-nbd scenarios will fail"
		continue
	}
	copy_with_libs "$p" "/usr/sbin/$tool"
done
# The retire-signatures scenario makes each kind of signature the retire marker must cover.
# Optional like the NBD tools: without them only that scenario fails, naming the missing tool.
for tool in mkfs.xfs mkfs.btrfs lvm mdadm; do
	p=$(command -v "$tool" 2>/dev/null) || {
		log "warning: $tool not found (scripts/setup-toolchain.sh installs it); retire-signatures will fail"
		continue
	}
	copy_with_libs "$p" "/usr/sbin/$tool"
done

cat >"$root/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/bin/sh
user:x:1000:1000:unprivileged test user:/home/user:/bin/sh
EOF
cat >"$root/etc/group" <<'EOF'
root:x:0:
user:x:1000:
EOF
chown 1000:1000 "$root/home/user"
echo blkmig-vm >"$root/etc/hostname"

[ "$module" != none ] && cp "$module" "$root/blkmig.ko"
[ "$migrate" != none ] && install -m 0755 "$migrate" "$root/usr/bin/migrate"
[ "$stampwriter" != none ] && install -m 0755 "$stampwriter" "$root/usr/bin/stampwriter"

install -m 0755 "$vm/init" "$root/init"
install -m 0644 "$vm/lib.sh" "$root/tests/lib.sh"
[ -f "$vm/live-lib.sh" ] && install -m 0644 "$vm/live-lib.sh" "$root/tests/live-lib.sh"
[ -f "$vm/remote-lib.sh" ] && install -m 0644 "$vm/remote-lib.sh" "$root/tests/remote-lib.sh"
[ -f "$vm/parts-lib.sh" ] && install -m 0644 "$vm/parts-lib.sh" "$root/tests/parts-lib.sh"
for s in "$vm"/scenarios/*.sh; do install -m 0755 "$s" "$root/tests/scenarios/"; done
# The JSON outputs' documentation, which scenarios check real outputs against (stampwriter jsondoc).
install -m 0644 "$repo/docs/json.md" "$root/tests/json.md"

# /dev/console must exist before /init runs, or init has no stdout.
mknod -m 0600 "$root/dev/console" c 5 1 2>/dev/null || log "warning: cannot mknod /dev/console (not root?); /init reopens it"

mkdir -p "$(dirname "$out")"
(cd "$root" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc --quiet) | gzip -1 >"$out.tmp"
mv "$out.tmp" "$out"
log "wrote $out ($(stat -c %s "$out") bytes; module: $([ "$module" = none ] && echo no || echo yes), migrate: $([ "$migrate" = none ] && echo no || echo yes), stampwriter: $([ "$stampwriter" = none ] && echo no || echo yes))"
