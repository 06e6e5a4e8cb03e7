#!/bin/sh
# live-two-migrations: two live migrations at once (vda -> vdb and vdc -> vdd), each under its
# own stampwriter with no gap. Both switch at their first attempt (the copier's own read of the
# source's head forces the writeback of dirty metadata over it, inside the window: the copier
# copies it and saves the head again there), and each writer's longest
# write stays within what the kernel says it held writes for (STATUS hold_longest_ns) plus a
# margin for the write itself: the pause the operator is told is the pause the application saw,
# and no switch attempt waits out the 5 s hold timeout because of the other migration.
# disks: 128M 128M 128M 128M
# needs: module migrate
# timeout: 480
. /tests/lib.sh
. /tests/live-lib.sh

live_prepare
for d in vda vdc; do
	step "ext4 on /dev/$d, a writer on it"
	must mkfs.ext4 -q -F /dev/$d
	mkdir -p /mnt/$d
	must mount -t ext4 /dev/$d /mnt/$d
	rm -f /tmp/$d.stop
	stampwriter write /mnt/$d/stamp.dat /tmp/$d.log --blocks 2048 --stop /tmp/$d.stop \
		--gap-us 0 --slow-ms 50 --seed ${#d} >/tmp/$d.out 2>&1 &
	eval "pid_$d=$!"
done
wait_until 180 "both writers stamped their blocks" sh -c 'grep -q "blocks stamped" /tmp/vda.out && grep -q "blocks stamped" /tmp/vdc.out'

step "both migrations at once"
migrate -v start /dev/vda /dev/vdb --max-pause 300ms --json >/tmp/m1.json 2>/tmp/m1.err &
m1=$!
migrate -v start /dev/vdc /dev/vdd --max-pause 300ms --json >/tmp/m2.json 2>/tmp/m2.err &
m2=$!
wait $m1
rc1=$?
wait $m2
rc2=$?
grep -v "^migrate \[" /tmp/m1.err | sed "s/^/  vda: /"; grep -v "^migrate \[" /tmp/m2.err | sed "s/^/  vdc: /"
[ $rc1 -eq 0 ] || fail "migrate start /dev/vda failed (exit $rc1): $(errtail /tmp/m1.err)"
[ $rc2 -eq 0 ] || fail "migrate start /dev/vdc failed (exit $rc2): $(errtail /tmp/m2.err)"
expect_mode /dev/vda redirect
expect_mode /dev/vdc redirect
for j in /tmp/m1.json /tmp/m2.json; do
	grep -q '"failed_switches":0[,}]' "$j" || fail "a switch attempt failed beside the other migration: $(grep '"event":"done"' "$j")"
done

for d in vda vdc; do
	touch /tmp/$d.stop
done
wait $pid_vda || fail "the writer on vda failed: $(errtail /tmp/vda.out)"
wait $pid_vdc || fail "the writer on vdc failed: $(errtail /tmp/vdc.out)"
for d in vda vdc; do
	w=$(sed -n 's/^STAMPWRITER-MAX-LATENCY-MS \([0-9.]*\).*/\1/p' /tmp/$d.out | tail -n1)
	h=$(migrate status /dev/$d --json | sed -n 's/.*"hold_longest_ns"[[:space:]]*:[[:space:]]*\([0-9]*\).*/\1/p')
	n=$(migrate status /dev/$d --json | sed -n 's/.*"holds"[[:space:]]*:[[:space:]]*\([0-9]*\).*/\1/p')
	echo "  /dev/$d: writer's longest write ${w} ms; kernel: ${n} hold(s), longest ${h} ns"
	grep -h '"event":"done"' /tmp/m1.json /tmp/m2.json | sed 's/^/  summary: /'
	[ -n "$w" ] && [ -n "$h" ] && [ -n "$n" ] || fail "missing figures for /dev/$d (writer '$w', hold_longest_ns '$h', holds '$n')"
	ok=$(echo "$w $h" | awk '{ print ($1 < 5000 && $1 <= $2 / 1e6 + 250) ? "yes" : "no" }')
	[ "$ok" = yes ] || fail "/dev/$d: the writer waited $w ms, more than the kernel's longest hold ($h ns) + 250 ms, or the hold timeout"
	echo "BLKMIG-PAUSE two-migrations dev=$d writer_ms=$w kernel_hold_ms=$(echo "$h" | awk '{ printf "%.1f", $1 / 1e6 }') holds=$n"
done
