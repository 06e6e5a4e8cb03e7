#!/usr/bin/env bash
# Copy speed against the disks' limit (in the VM). QEMU throttles both disks
# to RATE MiB/s for reads and for writes, so a copy from vda to vdb can go no
# faster than min(source read, target write) = RATE. In one guest, interleaved,
# bench/vm/limit.sh times dd (bs=4M, O_DIRECT), `migrate copy` and a live
# `migrate start` (no writer, no rate limit, switch included). Prints a
# Markdown table of ratios: bytes / (seconds x limit), and each tool against dd.
#
#   bench/limit-vm.sh [--paced] [RATE MiB/s, default 64] [MiB per disk, default 256] [extra -drive options]
#
# --paced: instead of QEMU's throttle, each disk is served over NBD by
# bench/paced-nbd.py, which spends length / RATE on each request, one at a
# time, like a disk limited by its own bandwidth (QEMU's throttle is a leaky
# bucket that drains while the disk is idle; see docs/benchmarks.md).
#
# The third argument is appended to both -drive options as it stands, e.g.
# "throttling.bps-read-max=67108864" to look at the throttle's burst
# behaviour. As root; builds what it needs like tests/vm/run.sh (kernel cached),
# and takes /tmp/blkmig-vm.lock around the guest, like run.sh.
# Environment: BLKMIG_BENCH_KO (below).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
paced=0
if [ "${1:-}" = --paced ]; then
	paced=1
	shift
fi
rate=${1:-64}
mb=${2:-256}
extra=${3:-}
bps=$((rate * 1024 * 1024))
kdir=$(scripts/build-kernel.sh)
# BLKMIG_BENCH_KO: a blkmig.ko already built against that kernel, to skip the
# module build (which waits for /tmp/blkmig-kbuild.lock while a kernel builds).
ko=${BLKMIG_BENCH_KO:-$(BLKMIG_KERNEL_TREE=$kdir scripts/build-module.sh)}
RUSTFLAGS="-C target-feature=+crt-static" cargo build --release -q --locked \
	--target x86_64-unknown-linux-gnu -p migrate -p blkmig-testtools --bins
work=$(mktemp -d /var/tmp/blkmig-bench.XXXXXX)
pids=()
cleanup() {
	for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
	rm -rf "$work"
}
trap cleanup EXIT
tests/vm/mkinitramfs.sh "$work/initramfs.cpio.gz" --module "$ko" \
	--migrate target/x86_64-unknown-linux-gnu/release/migrate \
	--stampwriter target/x86_64-unknown-linux-gnu/release/stampwriter >/dev/null
mkdir -p "$work/extra/tests/scenarios"
install -m 0755 bench/vm/limit.sh "$work/extra/tests/scenarios/bench-limit.sh"
(cd "$work/extra" && find . | LC_ALL=C sort | cpio -o -H newc --quiet | gzip -1) >>"$work/initramfs.cpio.gz"
# Fully allocated images; the source holds random data, so nothing is
# all-zero and every tool moves every byte.
head -c $((mb * 1024 * 1024)) /dev/urandom >"$work/vda.img"
dd if=/dev/zero of="$work/vdb.img" bs=1M count="$mb" status=none
throttle="throttling.bps-read=$bps,throttling.bps-write=$bps${extra:+,$extra}"
drives=()
for d in vda vdb; do
	if [ $paced = 1 ]; then
		python3 bench/paced-nbd.py "$work/$d.img" "$work/$d.sock" "$bps" &
		pids+=($!)
		for _ in $(seq 50); do [ -S "$work/$d.sock" ] && break; sleep 0.1; done
		drives+=(-drive "if=none,id=$d,format=raw,cache=writeback,file.driver=nbd,file.server.type=unix,file.server.path=$work/$d.sock${extra:+,$extra}")
	else
		drives+=(-drive "file=$work/$d.img,if=none,id=$d,format=raw,cache=writeback,$throttle")
	fi
	drives+=(-device "virtio-blk-pci,drive=$d")
done
log="target/bench-limit-console.log"
mkdir -p target
# One guest at a time on this machine (see tests/vm/run.sh); the wait is bounded.
exec 9>/tmp/blkmig-vm.lock
flock -w 1800 9 || {
	echo "bench: /tmp/blkmig-vm.lock still held after 30 minutes" >&2
	exit 1
}
timeout -k 5 900 qemu-system-x86_64 -accel tcg -smp 2,sockets=2 -m 512M -nographic -no-reboot \
	-kernel "$kdir/arch/x86/boot/bzImage" -initrd "$work/initramfs.cpio.gz" \
	-append "console=ttyS0 quiet panic=-1 blkmig.scenario=bench-limit blkmig.timeout=840" \
	"${drives[@]}" \
	</dev/null >"$work/console.log" 2>&1 || true
exec 9>&-
cp "$work/console.log" "$log"
grep -q "BLKMIG-VM-RESULT: PASS bench-limit" "$work/console.log" || {
	echo "bench: the guest run failed; see $log" >&2
	exit 1
}
python3 - "$work/console.log" "$bps" "$rate" "$extra" "$paced" <<'PY'
import re, statistics, sys
log, bps, rate, extra, paced = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5] == "1"
ratios = {}
for line in open(log, errors="replace"):
    m = re.search(r"BLKMIG-BENCH (\S+) bytes=(\d+) ms=(\d+)", line)
    if m:
        r = int(m.group(2)) / (int(m.group(3)) / 1000 * bps)
        ratios.setdefault(m.group(1), []).append(r)
    m = re.search(r"BLKMIG-BENCH-INFO (.*)", line)
    if m:
        info = m.group(1).strip()
med = {k: statistics.median(v) for k, v in ratios.items()}
how = "bench/paced-nbd.py serving both disks" if paced else "QEMU throttling.bps-read/bps-write on both disks"
print("limit: %s MiB/s (%s%s)" % (rate, how, ", " + extra if extra else ""))
print("guest queue: %s\n" % info)
# The disks' limit as measured in this run: the slower of reading the source
# alone and writing the target alone. The guest's clock can run slow when the
# host is loaded, which moves every figure against the nominal rate alike.
measured = min(med.get("read", 0), med.get("write", 0)) or 1.0
print("| run | each round, vs nominal limit | median vs nominal | median vs measured limit | median vs dd |")
print("|---|---|---|---|---|")
for k in ["read", "write", "dd", "copy", "copy1m", "live"]:
    if k in med:
        runs = " ".join("%.2f" % r for r in ratios[k])
        print("| %s | %s | %.2fx | %.2fx | %.2fx |" % (k, runs, med[k], med[k] / measured, med[k] / med["dd"]))
PY
