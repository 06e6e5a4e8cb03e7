#!/usr/bin/env bash
# Free space not copied, timed on disks of a known speed (in the VM). Runs the live-sparse-fs
# scenario (tests/vm/scenarios/live-sparse-fs.sh: a 1 GiB ext4 about 10% full, its free space
# holding old data, under a stamping writer; `migrate start --full-copy --no-switch` to vdc, then
# the default `migrate start` to vdb, which skips the free space and switches) with its three
# 1 GiB disks each served by bench/paced-nbd.py at RATE MiB/s, one request at a time, so that a
# copy's time is set by the bytes it moves, not by the host's page cache. Prints both runs'
# bytes and times and their ratios.
#
#   bench/sparse-vm.sh [RATE MiB/s, default 64]
#
# As root; builds what it needs (bench/lib.sh) and takes /tmp/blkmig-vm.lock around the guest.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
. bench/lib.sh
rate=${1:-64}
bench_build
bench_workdir
bench_initramfs sparse tests/vm/scenarios/live-sparse-fs.sh
drives=()
for d in vda vdb vdc; do
	truncate -s 1G "$work/$d.img"
	bench_disk "$d" paced $((rate * 1024 * 1024))
done
log=target/bench-sparse-console.log
bench_guest sparse "$log" "" 512M 1500
python3 - "$log" "$rate" <<'PY'
import re, sys
log, rate = sys.argv[1], sys.argv[2]
for line in open(log, errors="replace"):
    m = re.search(r"BLKMIG-SPARSE (.*)", line)
    if m:
        r = {k: float(v) for k, v in re.findall(r"(\w+)=([\d.]+)", m.group(1))}
mb = lambda b: b / 1e6
print("disks: 1 GiB each at %s MiB/s (bench/paced-nbd.py)\n" % rate)
print("| run | written to the target MB | seconds |")
print("|---|---|---|")
print("| `--full-copy --no-switch` | %.1f | %.1f |" % (mb(r["full_bytes"]), r["full_secs"]))
print("| default (switch included) | %.1f | %.1f |" % (mb(r["sparse_bytes"]), r["sparse_secs"]))
print("| ratio | %.1fx fewer bytes | %.1fx faster |" % (r["full_bytes"] / r["sparse_bytes"], r["full_secs"] / r["sparse_secs"]))
print("\nfree space skipped: %.1f MB" % mb(r["skipped"]))
PY
