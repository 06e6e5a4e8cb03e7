#!/usr/bin/env bash
# Benchmark the blkmig data path in the VM (bench/vm/filter.sh in one guest):
# O_DIRECT dd write and read throughput on the source with no filter, on the
# target alone, on the source in CLONE (every write mirrored) and in
# REDIRECT, ROUNDS rounds; the kernel memory of an attachment to a 1 TiB
# device (null_blk) at several region sizes; the copier's peak RSS. Prints
# Markdown tables: each path against what it should cost (reads in CLONE
# against the unfiltered source, writes in CLONE against the slower of the
# two disks alone, REDIRECT against the target alone), and the memory.
#
#   bench/filter-vm.sh [--paced] [MiB per dd, default 64] [RATE MiB/s, default 64] [ROUNDS, default 5]
#
# The disks are image files of twice that size. --paced: each is served over
# NBD by bench/paced-nbd.py at RATE (one request at a time, each held for
# length / RATE), so that the two legs of a mirrored write are independent
# disks of a known speed; without it they are plain files on the host (RATE
# is then unused). As root; builds what it needs like tests/vm/run.sh
# (kernel cached) and takes /tmp/blkmig-vm.lock around the guest.
# Environment: BLKMIG_BENCH_KO (see bench/lib.sh).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
. bench/lib.sh
how=plain
if [ "${1:-}" = --paced ]; then
	how=paced
	shift
fi
mb=${1:-64}
rate=${2:-64}
rounds=${3:-5}
bench_build
bench_workdir
bench_initramfs filter bench/vm/filter.sh "MB=$mb ROUNDS=$rounds"
# Fully allocated images, so that no measurement pays for the host
# filesystem allocating blocks of a sparse file.
drives=()
for d in vda vdb; do
	dd if=/dev/zero of="$work/$d.img" bs=1M count=$((mb * 2)) status=none
	bench_disk "$d" "$how" $((rate * 1024 * 1024))
done
# Two 1 TiB null_blk devices without memory behind them, for the kernel
# memory of an attachment.
log=target/bench-filter-$how-console.log
bench_guest filter "$log" "null_blk.nr_devices=2 null_blk.gb=1024" 1G
python3 - "$log" "$mb" "$how" "$rate" <<'PY'
import re, statistics, sys
log, mb, how, rate = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
runs, mem, vmalloc, rss, rss_1tib, info = {}, {}, [], [], [], []
for line in open(log, errors="replace"):
    line = line.strip()
    if m := re.search(r"BLKMIG-BENCH (\S+) us=(\d+)", line):
        runs.setdefault(m.group(1), []).append(int(m.group(2)))
    elif m := re.search(r"BLKMIG-BENCH-INFO (.*)", line):
        info.append(m.group(1))
    elif m := re.search(r"BLKMIG-MEM region=(\S+) regions=(\d+) (.*)", line):
        fields = dict(kv.split("=") for kv in m.group(3).split())
        mem.setdefault((m.group(1), int(m.group(2))), []).append({k: int(v) for k, v in fields.items()})
    elif m := re.search(r"BLKMIG-MEM-VMALLOC (.*)", line):
        vmalloc.append(m.group(1))
    elif m := re.search(r"BLKMIG-RSS (\S+) kb=(\d+) (.*)", line):
        rss.append((m.group(1), int(m.group(2)), m.group(3)))
    elif m := re.search(r"BLKMIG-RSS-(AT|END) (.*)", line):
        rss_1tib.append(m.group(2))
print("disks: %s" % ("bench/paced-nbd.py at %s MiB/s each" % rate if how == "paced" else "plain image files"))
for i in info:
    print("guest: %s" % i)
print()
# Each path against what it should cost; a ratio is throughput against the
# reference's (reference time / path time), per round and of the medians.
refs = [
    ("write-source-unfiltered", None), ("write-target-unfiltered", None),
    ("read-source-unfiltered", None), ("read-target-unfiltered", None),
    ("write-clone-mirrored", "slower leg"), ("read-clone", "read-source-unfiltered"),
    ("write-redirect", "write-target-unfiltered"), ("read-redirect", "read-target-unfiltered"),
]
def ref_times(ref):
    if ref == "slower leg":
        return [max(a, b) for a, b in zip(runs["write-source-unfiltered"], runs["write-target-unfiltered"])]
    return runs[ref]
print("| path | median ms (%d MiB) | MiB/s | against | each round | median |" % mb)
print("|---|---|---|---|---|---|")
for k, ref in refs:
    if k not in runs:
        continue
    med = statistics.median(runs[k])
    row = "| %s | %.1f | %.0f |" % (k, med / 1000, mb * 1e6 / med)
    if ref:
        rt = ref_times(ref)
        each = " ".join("%.3f" % (a / b) for a, b in zip(rt, runs[k]))
        row += " %s | %s | %.3fx |" % (ref, each, statistics.median(rt) / med)
    else:
        row += " | | |"
    print(row)
print("\n%d rounds in one guest (QEMU TCG, 2 vCPUs)." % len(runs.get("write-clone-mirrored", [])))
if mem:
    print("\nKernel memory of one attachment to a 1 TiB source (median of %d, KiB):\n" % len(next(iter(mem.values()))))
    keys = list(next(iter(mem.values()))[0].keys())
    print("| region size | regions | region words (8 B each) | " + " | ".join(keys) + " |")
    print("|---|---|---|" + "---|" * len(keys))
    for (rs, n), samples in mem.items():
        cells = []
        for k in keys:
            vals = [s[k] for s in samples]
            cells.append("%d (%s)" % (statistics.median(vals), " ".join(str(v) for v in vals)))
        print("| %s | %d | %d | %s |" % (rs, n, n * 8 // 1024, " | ".join(cells)))
    for v in vmalloc:
        print("    vmalloc: %s" % v)
for tool, kb, rest in rss:
    print("\npeak RSS of migrate %s: %.1f MiB (%s)" % (tool, kb / 1024, rest))
if rss_1tib:
    print("\nOn the 1 TiB null_blk source, each second:\n")
    for r in rss_1tib:
        print("    %s" % r)
PY
