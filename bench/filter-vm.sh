#!/usr/bin/env bash
# Benchmark the blkmig data path in the VM: O_DIRECT dd write and read
# throughput on the source with no filter, in CLONE (every write mirrored),
# in REDIRECT, and on the target alone, three rounds in one guest. Prints a
# Markdown table of medians and ratios to the unfiltered source.
#
#   bench/filter-vm.sh [MiB per dd, default 64]
# As root; builds what it needs like tests/vm/run.sh (kernel cached).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
mb=${1:-64}
kdir=$(scripts/build-kernel.sh)
ko=$(BLKMIG_KERNEL_TREE=$kdir scripts/build-module.sh)
RUSTFLAGS="-C target-feature=+crt-static" cargo build --release -q --locked \
	--target x86_64-unknown-linux-gnu -p migrate -p blkmig-testtools --bins
work=$(mktemp -d /var/tmp/blkmig-bench.XXXXXX)
trap 'rm -rf "$work"' EXIT
tests/vm/mkinitramfs.sh "$work/initramfs.cpio.gz" --module "$ko" \
	--migrate target/x86_64-unknown-linux-gnu/release/migrate \
	--stampwriter target/x86_64-unknown-linux-gnu/release/stampwriter >/dev/null
mkdir -p "$work/extra/tests/scenarios"
sed "s/^MB=.*/MB=$mb/" bench/vm/filter.sh >"$work/extra/tests/scenarios/bench-filter.sh"
chmod 0755 "$work/extra/tests/scenarios/bench-filter.sh"
(cd "$work/extra" && find . | LC_ALL=C sort | cpio -o -H newc --quiet | gzip -1) >>"$work/initramfs.cpio.gz"
# Fully allocated images, so that no measurement pays for the host
# filesystem allocating blocks of a sparse file.
for d in vda vdb; do dd if=/dev/zero of="$work/$d.img" bs=1M count=$((mb * 2)) status=none; done
timeout -k 5 900 qemu-system-x86_64 -accel tcg -smp 2,sockets=2 -m 512M -nographic -no-reboot \
	-kernel "$kdir/arch/x86/boot/bzImage" -initrd "$work/initramfs.cpio.gz" \
	-append "console=ttyS0 quiet panic=-1 blkmig.scenario=bench-filter blkmig.timeout=840" \
	-drive "file=$work/vda.img,if=virtio,format=raw,cache=writeback" \
	-drive "file=$work/vdb.img,if=virtio,format=raw,cache=writeback" \
	</dev/null >"$work/console.log" 2>&1 || true
cp "$work/console.log" target/bench-filter-console.log
grep -q "BLKMIG-VM-RESULT: PASS bench-filter" "$work/console.log" || {
	cp "$work/console.log" target/bench-filter-console.log
	echo "bench: the guest run failed; see target/bench-filter-console.log" >&2
	exit 1
}
python3 - "$work/console.log" "$mb" <<'PY'
import re, statistics, sys
runs = {}
for line in open(sys.argv[1], errors="replace"):
    m = re.search(r"BLKMIG-BENCH (\S+) ms=(\d+)", line)
    if m:
        runs.setdefault(m.group(1), []).append(int(m.group(2)))
mb = int(sys.argv[2])
med = {k: statistics.median(v) for k, v in runs.items()}
print("| path | median ms (%d MiB) | MiB/s | vs unfiltered source |" % mb)
print("|---|---|---|---|")
for k in ["write-source-unfiltered", "write-target-unfiltered", "write-clone-mirrored", "write-redirect",
          "read-source-unfiltered", "read-clone", "read-redirect"]:
    if k not in med:
        continue
    base = med["write-source-unfiltered" if k.startswith("write") else "read-source-unfiltered"]
    print("| %s | %d | %.0f | %.2fx |" % (k, med[k], mb * 1000 / max(med[k], 1), base / max(med[k], 1)))
print("\n%d rounds in one guest (QEMU TCG, 2 vCPUs), disks backed by files." % len(runs.get("write-clone-mirrored", [])))
PY
