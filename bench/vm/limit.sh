#!/bin/sh
# In the guest: device-to-device copies of /dev/vda to /dev/vdb, both disks
# held to a known rate by bench/limit-vm.sh, interleaved over ROUNDS rounds:
#   dd      dd bs=4M iflag=direct oflag=direct conv=fsync
#   copy    migrate copy (its defaults)
#   copy1m  migrate copy --region-size 1M (the live copy's region size)
#   live    migrate start (its defaults, no rate limit, no writer), switch
#           included, then detach
# and each disk alone: read (dd of the source to /dev/null) and write (dd of
# zeroes to the target, bs=4M, O_DIRECT). The write always runs just before
# the live copy: `migrate start` compares before it copies, and the target
# must not already hold the source's data from the previous copy.
# The order rotates from round to round. Prints one BLKMIG-BENCH line per run.
. /tests/lib.sh
# now_ms: the guest's clock in milliseconds
. /tests/bench-lib.sh
ROUNDS=3
BYTES=$(blockdev --getsize64 /dev/vda)

run_dd() {
	dd if=/dev/vda of=/dev/vdb bs=4M iflag=direct oflag=direct conv=fsync status=none ||
		fail "dd failed"
}
run_copy() {
	migrate copy /dev/vda /dev/vdb -q || fail "migrate copy failed"
}
run_read() {
	dd if=/dev/vda of=/dev/null bs=4M iflag=direct status=none || fail "dd read failed"
}
run_write() {
	dd if=/dev/zero of=/dev/vdb bs=4M count=$((BYTES / 4194304)) oflag=direct conv=fsync status=none ||
		fail "dd write failed"
}
# the same copier with the live copy's region size
run_copy1m() {
	migrate copy /dev/vda /dev/vdb -q --region-size 1M || fail "migrate copy --region-size 1M failed"
}
run_live() {
	migrate start /dev/vda /dev/vdb --json --max-pause 5s >/tmp/live.json || fail "migrate start failed"
}
# the detach after a live run is not timed
after_live() {
	# its summary: bytes copied, compared, matched
	echo "BLKMIG-BENCH-LIVE $(tail -n 1 /tmp/live.json)"
	expect_mode /dev/vda redirect >/dev/null
	migrate detach /dev/vda >/dev/null 2>&1 || fail "migrate detach failed"
}

timed() { # name
	t0=$(now_ms)
	"run_$1"
	t1=$(now_ms)
	echo "BLKMIG-BENCH $1 bytes=$BYTES ms=$((t1 - t0))"
	[ "$1" = live ] && after_live
	return 0
}

load_module
echo "BLKMIG-BENCH-INFO $(cat /sys/block/vda/queue/max_sectors_kb) max_sectors_kb, $(cat /sys/block/vda/queue/max_segments) max_segments, nr_requests $(cat /sys/block/vda/queue/nr_requests)"
# Warm up: one short copy with each tool (first-touch costs, guest caches).
dd if=/dev/vda of=/dev/vdb bs=4M count=4 iflag=direct oflag=direct status=none || fail "dd warm-up failed"
round=1
while [ $round -le $ROUNDS ]; do
	case $((round % 3)) in
	1) order="dd copy copy1m read write live" ;;
	2) order="copy copy1m read write live dd" ;;
	0) order="read write live dd copy copy1m" ;;
	esac
	for tool in $order; do timed "$tool"; done
	round=$((round + 1))
done
# The last copy must equal the source.
cmp /dev/vda /dev/vdb || fail "target differs from source after the last copy"
