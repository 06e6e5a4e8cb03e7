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
# Environment: BLKMIG_BENCH_KO (see bench/lib.sh).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
. bench/lib.sh
how=throttle
if [ "${1:-}" = --paced ]; then
	how=paced
	shift
fi
rate=${1:-64}
mb=${2:-256}
extra=${3:-}
bps=$((rate * 1024 * 1024))
paced=0
[ $how = paced ] && paced=1
bench_build
bench_workdir
bench_initramfs limit bench/vm/limit.sh
# Fully allocated images; the source holds random data, so nothing is
# all-zero and every tool moves every byte.
head -c $((mb * 1024 * 1024)) /dev/urandom >"$work/vda.img"
dd if=/dev/zero of="$work/vdb.img" bs=1M count="$mb" status=none
drives=()
for d in vda vdb; do bench_disk "$d" "$how" "$bps" "$extra"; done
log=target/bench-limit-console.log
bench_guest limit "$log"
python3 - "$log" "$bps" "$rate" "$extra" "$paced" <<'PY'
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
