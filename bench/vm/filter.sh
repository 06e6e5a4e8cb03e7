#!/bin/sh
# In the guest, for bench/filter-vm.sh. Three parts, each printing its own lines:
#
# 1. The data path (BLKMIG-BENCH NAME us=N): O_DIRECT dd of MB MiB (bs=1M) to
#    and from the raw source vda and the target vdb with no filter, then the
#    source in CLONE with every region synced but the first and last (which
#    the switch copies; a write there is not mirrored), then in
#    REDIRECT; ROUNDS rounds, each in that order.
# 2. Kernel memory of an attachment (BLKMIG-MEM), when there are null_blk
#    devices (nullb0, nullb1: 1 TiB each, nothing allocated behind them):
#    /proc/meminfo before and after `migrate attach` at several region
#    sizes, three times each after one attach and detach to warm up.
# 3. The copier's peak RSS (BLKMIG-RSS): `migrate copy` of vda to vdb, and
#    `migrate start` of vda with ext4 mounted from it and stampwriter
#    rewriting a file on it, both at their defaults but for -q and a pause
#    budget of 5 s (which the emulated disks need, and which does not change
#    what the copier allocates); and both on the 1 TiB null_blk source,
#    their RSS each second for 20 s (BLKMIG-RSS-AT).
. /tests/lib.sh
. /tests/live-lib.sh
. /tests/bench-lib.sh
MB=64
ROUNDS=5
. /tests/bench.conf

timed() { # NAME dd-args...: prints BLKMIG-BENCH NAME us=N
	_name=$1
	shift
	clock_us
	_t0=$CLOCK_US
	dd "$@" bs=1M count="$MB" status=none || fail "$_name: dd $* failed"
	clock_us
	echo "BLKMIG-BENCH $_name us=$((CLOCK_US - _t0))"
}
w() { timed "$1" if=/dev/zero of="$2" oflag=direct conv=notrunc; }
r() { timed "$1" if="$2" of=/dev/null iflag=direct; }

data_path() {
	# Warm up both disks (host cache, guest queues) before anything is timed.
	w warm /dev/vda >/dev/null
	w warm /dev/vdb >/dev/null
	r warm /dev/vda >/dev/null
	r warm /dev/vdb >/dev/null
	# What the timing adds to a transfer: an empty dd between two readings.
	clock_us
	_t0=$CLOCK_US
	dd if=/dev/zero of=/dev/null count=0 status=none
	clock_us
	echo "BLKMIG-BENCH-INFO an empty dd times at $((CLOCK_US - _t0)) us; $MB MiB per dd; $(cat /sys/block/vda/queue/max_sectors_kb) max_sectors_kb"
	_round=1
	while [ $_round -le "$ROUNDS" ]; do
		w write-source-unfiltered /dev/vda
		r read-source-unfiltered /dev/vda
		w write-target-unfiltered /dev/vdb
		r read-target-unfiltered /dev/vdb
		migrate start /dev/vda /dev/vdb --no-switch -q >/dev/null 2>&1 || fail "migrate start --no-switch failed"
		expect_mode /dev/vda clone
		# All but the first and last regions, which the switch copies.
		_total=$(status_field /dev/vda regions_total)
		expect_eq "$(status_field /dev/vda regions_synced)" $((_total - 2)) "regions synced"
		_m0=$(status_field /dev/vda writes_mirrored)
		w write-clone-mirrored /dev/vda
		[ $_round = 1 ] && echo "BLKMIG-BENCH-INFO CLONE: $((_total - 2)) of $_total regions synced; the timed write mirrored $(($(status_field /dev/vda writes_mirrored) - _m0)) bios"
		r read-clone /dev/vda
		migrate start /dev/vda /dev/vdb -q --max-pause 5s >/dev/null 2>&1 || fail "migrate start (switch) failed"
		expect_mode /dev/vda redirect
		w write-redirect /dev/vda
		r read-redirect /dev/vda
		migrate detach /dev/vda >/dev/null 2>&1 || fail "detach failed"
		_round=$((_round + 1))
	done
}

MEM_FIELDS="MemFree Slab SUnreclaim VmallocUsed KernelStack PageTables Percpu"
mem_read() { # PREFIX: PREFIX_FIELD=kB for each of MEM_FIELDS
	for _f in $MEM_FIELDS; do
		eval "$1_$_f=$(sed -n "s/^$_f: *\([0-9]*\) kB/\1/p" /proc/meminfo)"
	done
}
settle() {
	sync
	echo 3 >/proc/sys/vm/drop_caches
	sleep 1
}
attach_cost() { # REGION_SIZE: one BLKMIG-MEM line
	settle
	awk '$2 >= 65536' /proc/vmallocinfo >/tmp/vm.before
	mem_read a
	migrate attach /dev/nullb0 /dev/nullb1 --region-size "$1" >/dev/null 2>&1 || fail "migrate attach --region-size $1 failed"
	settle
	mem_read b
	_line="BLKMIG-MEM region=$1 regions=$(status_field /dev/nullb0 regions_total)"
	for _f in $MEM_FIELDS; do
		eval "_d=\$((a_$_f - b_$_f))"
		[ "$_f" = MemFree ] || _d=$((-_d))
		_line="$_line $_f=$_d"
	done
	echo "$_line"
	awk '$2 >= 65536' /proc/vmallocinfo | grep -vxF -f /tmp/vm.before | sed 's/^/BLKMIG-MEM-VMALLOC /'
	migrate detach /dev/nullb0 >/dev/null 2>&1 || fail "migrate detach /dev/nullb0 failed"
}
kernel_memory() {
	echo "BLKMIG-BENCH-INFO nullb0 $(blockdev --getsize64 /dev/nullb0) bytes, nullb1 $(blockdev --getsize64 /dev/nullb1) bytes"
	# The region sizes: the largest, the default and the smallest a 1 TiB
	# device may have (REGIONS_MAX regions); the next smaller is refused.
	expect_fail_msg "more than the" migrate attach /dev/nullb0 /dev/nullb1 --region-size 32K
	attach_cost 1G >/dev/null
	for _rs in 1G 1M 64K; do
		for _i in 1 2 3; do attach_cost "$_rs"; done
	done
}

copier_rss() {
	_kb=$(peak_rss_kb /tmp/copy.out migrate copy /dev/vda /dev/vdb -q) || fail "migrate copy failed: $(tail -n 3 /tmp/copy.out)"
	echo "BLKMIG-RSS copy kb=$_kb bytes=$(blockdev --getsize64 /dev/vda)"
	live_begin /dev/vda
	_kb=$(peak_rss_kb /tmp/start.out migrate start /dev/vda /dev/vdb -q --max-pause 5s) ||
		fail "migrate start failed: $(tail -n 3 /tmp/start.out)"
	expect_mode /dev/vda redirect
	echo "BLKMIG-RSS start kb=$_kb bytes=$(blockdev --getsize64 /dev/vda) writes_mirrored=$(status_field /dev/vda writes_mirrored)"
	sw_stop
	must umount /mnt/src
	must migrate detach /dev/vda
}

# rss_running NAME SECONDS CMD...: runs CMD for up to SECONDS and prints,
# every second, its resident set and peak (VmRSS, VmHWM, KiB) with the
# source's regions in sync; then stops it with SIGTERM. Says so if CMD ended
# by itself (its last lines, and the kernel's OOM report if there is one).
rss_running() {
	_name=$1
	_secs=$2
	shift 2
	dmesg -c >/dev/null
	"$@" >/tmp/run.out 2>&1 &
	_pid=$!
	_t=1
	while [ $_t -le "$_secs" ]; do
		sleep 1
		_st=$(cat /proc/$_pid/status 2>/dev/null) || break
		echo "BLKMIG-RSS-AT $_name t=$_t $(echo "$_st" | grep -E '^Vm(RSS|HWM)' | tr -s ' \t\n' ' ') synced=$(status_field /dev/nullb0 regions_synced)"
		_t=$((_t + 1))
	done
	if kill -TERM $_pid 2>/dev/null; then
		wait $_pid
	else
		wait $_pid
		echo "BLKMIG-RSS-END $_name ended by itself after ${_t} s (exit $?): $(tail -n 2 /tmp/run.out | tr '\n' ' ') $(dmesg | grep -i 'out of memory' | head -n 1)"
	fi
	return 0
}
# The copier on a 1 TiB source (null_blk, reads of zeros without I/O).
copier_rss_1tib() {
	rss_running start-1TiB 20 migrate start /dev/nullb0 /dev/nullb1 -q
	[ "$(status_mode /dev/nullb0)" = clone ] && must migrate detach /dev/nullb0
	# The same with glibc's malloc held to one arena, and with its mmap
	# threshold fixed (so that a freed region buffer goes back to the kernel):
	# whether the growth is the allocator keeping freed buffers.
	rss_running start-1TiB-one-arena 10 env MALLOC_ARENA_MAX=1 migrate start /dev/nullb0 /dev/nullb1 -q
	[ "$(status_mode /dev/nullb0)" = clone ] && must migrate detach /dev/nullb0
	rss_running start-1TiB-mmap-threshold 10 env MALLOC_MMAP_THRESHOLD_=131072 migrate start /dev/nullb0 /dev/nullb1 -q
	[ "$(status_mode /dev/nullb0)" = clone ] && must migrate detach /dev/nullb0
	rss_running copy-1TiB 20 migrate copy /dev/nullb0 /dev/nullb1 -q
}

load_module
if [ -b /dev/nullb0 ]; then
	kernel_memory
	copier_rss_1tib
fi
data_path
copier_rss
