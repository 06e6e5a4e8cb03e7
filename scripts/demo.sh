#!/usr/bin/env bash
# The blkmig demo, as root on Debian 12: a live migration of a mounted, busy ext4 filesystem,
# in a QEMU guest running our kernel (Linux 6.12 + kmod/patches) with blkmig.ko.
#
# It installs what it needs (scripts/setup-toolchain.sh), builds the kernel (cached after the
# first time, which takes a few minutes), the module, the static `migrate` and `stampwriter`
# and the VM test initramfs (tests/vm/), then boots the guest with tests/vm/demo/demo.sh:
# mkfs.ext4 + files on /dev/vda, a writer rewriting a file non-stop, `migrate start /dev/vda
# /dev/vdb` with its progress, the switch, and the checks (target fsck-clean, every file and
# every written block intact, source retired). The guest's console is shown as it runs.
# Exit status 0 only if the guest reports success.
#
# The offline image-copy demo is scripts/demo-copy.sh.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
say() { printf '\n=== %s\n' "$*"; }

[ "$(id -u)" = 0 ] || {
	echo "demo: run me as root (installs packages, builds a kernel)" >&2
	exit 1
}

say "toolchain (scripts/setup-toolchain.sh; idempotent)"
scripts/setup-toolchain.sh
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"

say "kernel (scripts/build-kernel.sh: Linux 6.12 + blkmig hook, cached after the first build)"
kdir=$(scripts/build-kernel.sh)
say "module (scripts/build-module.sh)"
ko=$(BLKMIG_KERNEL_TREE=$kdir scripts/build-module.sh)
say "migrate and stampwriter, static (cargo)"
RUSTFLAGS="-C target-feature=+crt-static" cargo build --release -q \
	--target x86_64-unknown-linux-gnu -p migrate -p blkmig-testtools --bins

work=$(mktemp -d /var/tmp/blkmig-demo.XXXXXX)
trap 'rm -rf "$work"' EXIT
say "initramfs (tests/vm/mkinitramfs.sh + the demo script)"
tests/vm/mkinitramfs.sh "$work/initramfs.cpio.gz" --module "$ko" \
	--migrate target/x86_64-unknown-linux-gnu/release/migrate \
	--stampwriter target/x86_64-unknown-linux-gnu/release/stampwriter
# The demo script goes in a second archive appended to the first (the kernel unpacks both), so
# that `tests/vm/run.sh` never runs it as a scenario.
mkdir -p "$work/extra/tests/scenarios"
install -m 0755 tests/vm/demo/demo.sh "$work/extra/tests/scenarios/demo.sh"
(cd "$work/extra" && find . | LC_ALL=C sort | cpio -o -H newc --quiet | gzip -1) >>"$work/initramfs.cpio.gz"

truncate -s 256M "$work/vda.img" "$work/vdb.img"
say "booting the guest (QEMU, TCG: no KVM needed; about a minute)"
limit=600
set +e
timeout -k 5 $((limit + 60)) qemu-system-x86_64 -accel tcg -smp 2,sockets=2 -m 512M \
	-nographic -no-reboot -kernel "$kdir/arch/x86/boot/bzImage" -initrd "$work/initramfs.cpio.gz" \
	-append "console=ttyS0 quiet panic=-1 blkmig.scenario=demo blkmig.timeout=$limit" \
	-drive "file=$work/vda.img,if=virtio,format=raw,cache=writeback,discard=unmap" \
	-drive "file=$work/vdb.img,if=virtio,format=raw,cache=writeback,discard=unmap" \
	</dev/null 2>&1 | sed -u 's/\x1b[[?0-9;]*[a-zA-Z]//g; s/\x1bc//g; s/\r$//' | tee "$work/console.log"
set -e

oops=$(grep -m1 -E 'BUG:|WARNING: CPU|Oops|Call Trace|Kernel panic|general protection fault|kernel BUG at|panicked at' "$work/console.log" || true)
if grep -qx 'BLKMIG-VM-RESULT: PASS demo' "$work/console.log" && [ -z "$oops" ]; then
	echo "demo: OK"
	exit 0
fi
mkdir -p target
cp "$work/console.log" target/demo-console.log
echo "demo: FAILED${oops:+ ($oops)}; console log: target/demo-console.log" >&2
grep -m1 '^BLKMIG-VM-RESULT' "$work/console.log" >&2 || echo "(no result line: the guest crashed or timed out)" >&2
exit 1
