#!/bin/sh
# switch-target-removed: the target disk is hot-removed while the copier is frozen inside its
# switch window (writes held). The failure must win: the held writes go to the source within the
# hold timeout, the migration is FAILED, `migrate start` exits non-zero, nothing is retired, and
# the source's filesystem is fsck-clean with every stamp. (The copier is frozen as in
# live-kill-in-switch: ~20 ms slices until `migrate status` says it holds writes in clone mode.)
# disks: 160M 160M
# needs: module migrate
# timeout: 300
. /tests/lib.sh
. /tests/live-lib.sh

HOT=1000
SW_ARGS="--hot $HOT --gap-us 500"
pci=$(readlink -f /sys/block/vdb/device/..)
[ -e "$pci/remove" ] || fail "no PCI remove attribute for vdb ($pci)"
live_begin /dev/vda

step "migrate start --hold-timeout-ms 2000, frozen inside its switch window"
# --max-pause 1s: the copier holds with regions still to copy, so that its window (short since
# the head is saved and both devices flushed before the hold) is long enough to be caught.
migrate start /dev/vda /dev/vdb --hold-timeout-ms 2000 --max-pause 1s >/tmp/mig1.log 2>&1 &
mig=$!
freeze_in_switch_window $mig /dev/vda
hit=$HIT
echo "BLKMIG-TARGET-REMOVED-IN-SWITCH hit=$hit"
[ $hit = yes ] || fail "the copier was never seen frozen inside a switch window"

step "remove the target while writes are held"
t_rm=$(cs_now)
echo 1 >"$pci/remove" || fail "PCI remove of the target failed"
expect_mode /dev/vda failed
kill -CONT $mig
wait $mig
rc=$?
sed 's/^/  migrate: /' /tmp/mig1.log | tail -n 5
[ $rc -ne 0 ] || fail "migrate start exited 0 although the target went away in its switch window"
s0=$(hot_seq "$SW_FILE" $HOT)
resumed=
while [ $(($(cs_now) - t_rm)) -le 300 ]; do
	s=$(hot_seq "$SW_FILE" $HOT)
	if [ -n "$s" ] && [ "$s" -gt "${s0:-0}" ]; then
		resumed=$(($(cs_now) - t_rm))
		break
	fi
	sleep 0.05
done
[ -n "$resumed" ] || fail "the writer made no progress within 3 s of the target's removal"
echo "  the hot block's stamp advanced $((resumed * 10)) ms after the removal"
expect_eq "$(status_field /dev/vda writes_held)" 0 "writes held after the failure"

live_check_intact /dev/vda
unload_module
ok=$(echo "$SW_MAX_MS" | awk '{ print ($1 <= 3000) ? "yes" : "no" }')
[ "$ok" = yes ] || fail "a write waited $SW_MAX_MS ms: more than the 2000 ms hold timeout + 1 s"
