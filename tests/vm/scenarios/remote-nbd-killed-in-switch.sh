#!/bin/sh
# remote-nbd-killed-in-switch: the NBD server behind the target (/dev/nbd0, vdb served on the
# loopback interface, 5 s client request timeout) is killed with SIGKILL while the copier is
# frozen inside its switch window: writes are held, the target is not yet flushed, the source
# not yet retired. The copier is frozen as in switch-target-removed (~20 ms slices until
# `migrate status` says it holds writes in clone mode), then the scenario waits until every
# thread of it is stopped (none inside an ioctl, so the SWITCH request cannot complete behind
# its back) and checks that writes are still held. The failure must win: `migrate start` exits
# 1 without switching, the held writes go on to the source within the hold timeout plus the
# NBD timeout, nothing stays held, nothing is retired, and the source's filesystem is
# fsck-clean with every stamp.
# disks: 160M 160M
# needs: module migrate
# timeout: 300
. /tests/lib.sh
. /tests/live-lib.sh
. /tests/remote-lib.sh

HOLD_MS=3000
HOT=1000
# shellcheck disable=SC2034 # read by live_begin (live-lib.sh)
SW_ARGS="--hot $HOT --gap-us 500"

_mig_exited() {
	! kill -0 "$mig" 2>/dev/null
}
# every thread of the copier is stopped by SIGSTOP (state T or t): none is inside a system call
_mig_all_stopped() {
	for _s in /proc/"$mig"/task/*/stat; do
		_st=$(sed 's/.*) \([A-Za-z]\) .*/\1/' "$_s" 2>/dev/null)
		case "$_st" in T | t) ;; *) return 1 ;; esac
	done
}

lo_up
nbd_serve /dev/vdb
nbd_connect
live_begin /dev/vda

step "migrate start --hold-timeout-ms $HOLD_MS, frozen inside its switch window"
# --max-pause 1s: the copier holds with regions still to copy, so that its window (short since
# the head is saved and both devices flushed before the hold) is long enough to be caught.
migrate start /dev/vda /dev/nbd0 --hold-timeout-ms $HOLD_MS --max-pause 1s >/tmp/mig.log 2>&1 &
mig=$!
freeze_in_switch_window $mig /dev/vda
echo "BLKMIG-NBD-KILLED-IN-SWITCH hit=$HIT slices=$SLICES"
[ "$HIT" = yes ] || fail "the copier was never seen frozen inside a switch window"
wait_until 5 "every thread of migrate (pid $mig) to be stopped" _mig_all_stopped
st=$(migrate status /dev/vda --json)
case "$st" in
*'"holding":true'*) ;;
*) fail "the copier is stopped but writes are no longer held (the hold timed out first?): $st" ;;
esac
expect_mode /dev/vda clone

step "kill -9 the NBD server (pid $NBD_SERVER_PID) while writes are held"
t_kill=$(cs_now)
kill -9 "$NBD_SERVER_PID" || fail "cannot kill nbd-server"
wait "$NBD_SERVER_PID" 2>/dev/null
kill -CONT $mig
wait_until 60 "migrate start to exit after the server was killed" _mig_exited
wait $mig
rc=$?
secs=$(echo "$t_kill $(cs_now)" | awk '{ printf "%.1f", ($2 - $1) / 100 }')
sed 's/^/  migrate: /' /tmp/mig.log | tail -n 6
echo "  migrate start exited $rc, ${secs}s after the kill"
expect_eq "$rc" 1 "exit status of migrate start after the server was killed in its switch window"
grep -q '^switched:' /tmp/mig.log && fail "migrate switched to a dead target"
last=$(grep '^migrate: ' /tmp/mig.log | tail -n1)
[ -n "$last" ] || fail "migrate printed no error line: $(errtail /tmp/mig.log)"
echo "BLKMIG-NBD-KILLED-IN-SWITCH message: $last"
case "$last" in
*"the migration failed in the kernel: "*"the target"*"the source is intact"*) ;;
*" failed on /dev/nbd0"*"(EIO)") ;;
*) fail "migrate's error names neither the kernel's failure of the target nor an I/O error on /dev/nbd0: $last" ;;
esac

step "the held writes went on to the source"
# The writer's hot block: its stamp on the source advances once the held writes are released.
limit_cs=$(((HOLD_MS + NBD_TIMEOUT * 1000 + 1000) / 10))
s0=$(hot_seq "$SW_FILE" $HOT)
resumed=
while [ $(($(cs_now) - t_kill)) -le $limit_cs ]; do
	s=$(hot_seq "$SW_FILE" $HOT)
	if [ -n "$s" ] && [ "$s" -gt "${s0:-0}" ]; then
		resumed=$(($(cs_now) - t_kill))
		break
	fi
	sleep 0.05
done
[ -n "$resumed" ] || fail "the writer made no progress within $((limit_cs * 10)) ms of the kill"
echo "  the hot block's stamp advanced $((resumed * 10)) ms after the kill"
mode=$(status_mode /dev/vda)
case "$mode" in failed | clone) echo "  filter mode: $mode" ;; *) fail "mode of /dev/vda after the server was killed: '$mode'" ;; esac
expect_eq "$(status_field /dev/vda writes_held)" 0 "writes held after the failure"

live_check_intact /dev/vda
echo "BLKMIG-NBD-KILLED-IN-SWITCH writer_max_ms=$SW_MAX_MS migrate_exit_s=$secs mode=$mode"
ok=$(echo "$SW_MAX_MS" | awk -v l=$((HOLD_MS + NBD_TIMEOUT * 1000 + 2000)) '{ print ($1 <= l) ? "yes" : "no" }')
[ "$ok" = yes ] || fail "a write waited $SW_MAX_MS ms: more than the hold timeout + the NBD timeout + 2 s"
blkid -p /dev/vda | grep -q 'TYPE="ext4"' || fail "the source is no longer recognisable as ext4: $(blkid -p /dev/vda 2>&1)"
# shellcheck disable=SC2034 # read by offline_state (live-lib.sh): migrate start's state directory
CRASH_STATE=/var/lib/blkmig
offline_state /dev/vda
expect_eq "$OFFLINE_STATE" source_authoritative "state of /dev/vda after the failed migration"
run_capture timeout 20 nbd-client -d "$NBD_DEV"
unload_module
