#!/usr/bin/env bash
# blkmig side by side with its peers (in the VM). In one guest, the same mounted ext4 moves from
# vda to vdb (both MiB in size, both held to RATE MiB/s) under the same live workload (a writer of
# random 4 KiB O_DIRECT blocks on a fixed schedule and a paced reader), by blkmig, LVM's pvmove,
# dm-clone and mdadm --replace, and, unmounted, by dd (the floor for time); a run of the workload
# alone is the reference. bench/vm/peers.sh says how each is set up. Prints a Markdown table:
# migration time, the writer's rate and 99th-percentile latency against the workload alone, its
# longest write (the longest pause), the guest's CPU time, and each against blkmig.
#
#   bench/peers-vm.sh [--paced] [RATE MiB/s, default 32] [MiB per disk, default 512]
#
# Disks as in bench/limit-vm.sh: QEMU's throttle, or with --paced bench/paced-nbd.py serving each
# disk one request at a time. A third disk, 64 MiB and not limited, holds dm-clone's metadata.
# As root; needs lvm2 and mdadm on the host (scripts/setup-toolchain.sh), which go into the
# guest's initramfs. Environment: BLKMIG_BENCH_KO (bench/lib.sh), BLKMIG_PEERS (below).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
. bench/lib.sh
paced=0
[ "${1:-}" != --paced ] || { paced=1 && shift; }
rate=${1:-32}
mb=${2:-512}
bps=$((rate * 1024 * 1024))
for t in lvm mdadm; do
	command -v "$t" >/dev/null || {
		echo "bench: $t is missing: run scripts/setup-toolchain.sh" >&2
		exit 1
	}
done
bench_build
bench_workdir
mkdir -p "$work/extra/etc/lvm" "$work/extra/run/lock/lvm"
cp bench/vm/lvm.conf "$work/extra/etc/lvm/lvm.conf"
# BLKMIG_PEERS: some of the runs only, e.g. "base md" (default: every one, bench/vm/peers.sh)
[ -z "${BLKMIG_PEERS:-}" ] || echo "METHODS=\"$BLKMIG_PEERS\"" >"$work/extra/etc/bench-peers"
bench_initramfs peers bench/vm/peers.sh "" --tool lvm --tool mdadm
for d in vda vdb; do dd if=/dev/zero of="$work/$d.img" bs=1M count="$mb" status=none; done
truncate -s 64M "$work/vdc.img"
drives=()
how=throttle
[ $paced = 0 ] || how=paced
for d in vda vdb; do bench_disk $d $how "$bps"; done
bench_disk vdc plain
bench_guest peers target/bench-peers-console.log "" 512M 1500
python3 - "$work/console.log" "$rate" "$mb" "$paced" <<'PY'
import re, sys
log, rate, mb, paced = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1"
runs, failed = {}, {}
for line in open(log, errors="replace"):
    m = re.search(r"BLKMIG-PEER-FAILED name=(\S+) (.*)", line)
    if m:
        failed[m.group(1)] = "failed: " + m.group(2).strip()
        continue
    m = re.search(r"BLKMIG-PEER name=(\S+) (.*)", line)
    if m:
        runs[m.group(1)] = {k: float(v) for k, v in re.findall(r"(\w+)=([\d.]+)", m.group(2))}
how = "bench/paced-nbd.py serving both disks" if paced else "QEMU throttling.bps-read/bps-write on both disks"
print("disks: %s MiB each at %s MiB/s (%s)\n" % (mb, rate, how))
base, ref = runs["base"], runs.get("blkmig", runs["base"])
HZ = 100  # USER_HZ: /proc/stat counts in 1/100 s
base_busy = base["busy"] / (base["ms"] / 1000)  # the workload's own CPU, jiffies per second
def extra_cpu(r):
    # CPU seconds beyond what the workload alone takes in as long
    return (r["busy"] - base_busy * r["ms"] / 1000 * (r["writes"] > 0)) / HZ
wrate = lambda r: r["writes"] / r["wsecs"]
rrate = lambda r: r["reads"] / (r["ms"] / 1000)
print("workload alone: %.0f writes/s, p99 write %.1f ms, longest write %.1f ms, %.1f reads/s, CPU %.2f s/s"
      % (wrate(base), base["p99_us"] / 1e3, base["max_us"] / 1e3, rrate(base), base_busy / HZ))
print()
print("| method | migration s | time vs blkmig | writes/s vs alone | p99 write ms | p99 vs alone | longest write ms | longest vs blkmig | reads/s vs alone | CPU s over the workload's | CPU vs blkmig |")
print("|---|---|---|---|---|---|---|---|---|---|---|")
for k in ["blkmig", "blkmig-100ms", "blkmig-noyield", "blkmig-qd2", "pvmove", "clone", "md", "dd"]:
    if k not in runs:
        why = failed.get(k, "did not run")
        print("| %s | %s | | | | | | | | | |" % (k, why))
        continue
    r = runs[k]
    live = r["writes"] > 0
    cells = [k, "%.1f" % (r["ms"] / 1000), "%.2fx" % (r["ms"] / ref["ms"])]
    if live:
        cells += ["%.2fx" % (wrate(r) / wrate(base)), "%.1f" % (r["p99_us"] / 1e3),
                  "%.1fx" % (r["p99_us"] / base["p99_us"]), "%.1f" % (r["max_us"] / 1e3),
                  "%.2fx" % (r["max_us"] / ref["max_us"]), "%.2fx" % (rrate(r) / rrate(base))]
    else:
        cells += ["offline"] + [""] * 5
    cells += ["%.1f" % extra_cpu(r), "%.2fx" % (extra_cpu(r) / extra_cpu(ref))]
    print("| " + " | ".join(cells) + " |")
PY
