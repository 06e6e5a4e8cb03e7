#!/bin/sh
# In the guest: write throughput of the raw source with no filter, in CLONE
# with every write mirrored, in REDIRECT, and of the target alone; reads
# likewise. O_DIRECT dd, same sizes, same run. Prints BLKMIG-BENCH lines.
. /tests/lib.sh
MB=${BENCH_MB:-64}
# Milliseconds since boot, at /proc/uptime's 10 ms resolution (busybox
# date has no %N); each transfer below takes hundreds of milliseconds.
now_ms() { echo $(( $(cut -d' ' -f1 /proc/uptime | tr -d .) * 10 )); }
dev_secs() { # dd args... -> milliseconds
	t0=$(now_ms)
	dd "$@" bs=1M count=$MB oflag=direct iflag=direct status=none 2>/dev/null || dd "$@" bs=1M count=$MB status=none
	t1=$(now_ms)
	echo $(( t1 - t0 ))
}
w() { dev_secs if=/dev/zero of="$1" conv=notrunc; }
r() { dev_secs if="$1" of=/dev/null; }
report() { # name ms
	echo "BLKMIG-BENCH $1 ms=$2 MiBps=$(( MB * 1000 / ($2 + 1) ))"
}
load_module
# Warm up both disks (host cache, guest queues) before anything is timed.
w /dev/vda >/dev/null; w /dev/vdb >/dev/null; r /dev/vda >/dev/null; r /dev/vdb >/dev/null
for round in 1 2 3; do
	report "write-source-unfiltered" "$(w /dev/vda)"
	report "read-source-unfiltered" "$(r /dev/vda)"
	report "write-target-unfiltered" "$(w /dev/vdb)"
	migrate start /dev/vda /dev/vdb --no-switch -q --region-size 1M >/dev/null 2>&1 || fail "migrate start --no-switch failed"
	expect_mode /dev/vda clone
	report "write-clone-mirrored" "$(w /dev/vda)"
	report "read-clone" "$(r /dev/vda)"
	migrate start /dev/vda /dev/vdb -q --max-pause 5s >/dev/null 2>&1 || fail "migrate start (switch) failed"
	expect_mode /dev/vda redirect
	report "write-redirect" "$(w /dev/vda)"
	report "read-redirect" "$(r /dev/vda)"
	migrate detach /dev/vda >/dev/null 2>&1 || fail "detach failed"
done
