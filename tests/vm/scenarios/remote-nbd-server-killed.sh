#!/bin/sh
# remote-nbd-server-killed: the NBD server behind the target (/dev/nbd0, vdb served on the
# loopback interface, 5 s client request timeout) is killed with SIGKILL in the middle of the
# copy, once 16 regions are in sync (the copy is slowed to 8 MiB/s). The application never
# notices: its writes to the mounted ext4 keep being acknowledged, none waits longer than the
# NBD timeout plus 5 s, and nothing hangs. `migrate start` exits 1 within 60 s with a message
# that says the migration failed and the source is intact; nothing is retired: the source keeps
# its ext4 superblock and no marker, `migrate status` says FAILED while attached and, once
# detached, that the source holds the filesystem; fsck is clean and every stamp is there.
# disks: 160M 160M
# needs: module migrate
# timeout: 300
. /tests/lib.sh
. /tests/live-lib.sh
. /tests/remote-lib.sh

_mig_exited() {
	! kill -0 "$mig" 2>/dev/null
}

lo_up
nbd_serve /dev/vdb
nbd_connect
live_begin /dev/vda

step "migrate start /dev/vda /dev/nbd0 (copy slowed to ~8 MiB/s)"
migrate start /dev/vda /dev/nbd0 --rate-limit 8M --full-copy --max-pause 200ms >/tmp/mig.log 2>&1 &
mig=$!
wait_synced /dev/vda 16 120
synced=$(status_field /dev/vda regions_synced)
total=$(status_field /dev/vda regions_total)
echo "  $synced of $total regions in sync"
[ "$synced" -lt "$total" ] || fail "the copy finished before the server could be killed ($synced of $total)"

step "kill -9 the NBD server (pid $NBD_SERVER_PID)"
t_kill=$(cs_now)
kill -9 "$NBD_SERVER_PID" || fail "cannot kill nbd-server"
wait "$NBD_SERVER_PID" 2>/dev/null
# migrate must give up by itself, and soon: bounded, never a hang.
wait_until 60 "migrate start to exit after the server was killed" _mig_exited
wait $mig
rc=$?
secs=$(echo "$t_kill $(cs_now)" | awk '{ printf "%.1f", ($2 - $1) / 100 }')
sed 's/^/  migrate: /' /tmp/mig.log | tail -n 6
echo "  migrate start exited $rc, ${secs}s after the kill"
expect_eq "$rc" 1 "exit status of migrate start after the server was killed"
grep -q '^switched:' /tmp/mig.log && fail "migrate switched to a dead target"
last=$(grep '^migrate: ' /tmp/mig.log | tail -n1)
[ -n "$last" ] || fail "migrate printed no error line: $(errtail /tmp/mig.log)"
# Either the kernel failed the migration (a mirrored write to the target failed), or the
# copier's own read or write of the target failed first: both name the target's failure.
case "$last" in
*"the migration failed in the kernel: "*"the target"*"the source is intact"*) ;;
*" failed on /dev/nbd0 at offset "*"(EIO)") ;;
*) fail "migrate's error names neither the kernel's failure of the target nor an I/O error on /dev/nbd0: $last" ;;
esac
echo "BLKMIG-NBD-KILLED message: $last"

step "the filter is FAILED: mirroring stopped, the source serves everything"
mode=$(status_mode /dev/vda)
case "$mode" in failed | clone) echo "  filter mode: $mode" ;; *) fail "mode of /dev/vda after the server was killed: '$mode'" ;; esac
expect_eq "$(status_field /dev/vda writes_held)" 0 "writes held after the failure"
sw_alive

live_check_intact /dev/vda
ok=$(echo "$SW_MAX_MS $NBD_TIMEOUT" | awk '{ print ($1 <= ($2 + 5) * 1000) ? "yes" : "no" }')
echo "BLKMIG-NBD-KILLED writer_max_ms=$SW_MAX_MS migrate_exit_s=$secs mode=$mode"
[ "$ok" = yes ] || fail "a write waited $SW_MAX_MS ms: more than the NBD timeout (${NBD_TIMEOUT}s) + 5 s"

step "nothing retired: the source holds the filesystem"
blkid -p /dev/vda | grep -q 'TYPE="ext4"' || fail "the source is no longer recognisable as ext4: $(blkid -p /dev/vda 2>&1)"
# shellcheck disable=SC2034 # read by offline_state (live-lib.sh): migrate start's state directory
CRASH_STATE=/var/lib/blkmig
offline_state /dev/vda
expect_eq "$OFFLINE_STATE" source_authoritative "state of /dev/vda after the failed migration"
migrate status /dev/vda | sed 's/^/  /'
run_capture timeout 20 nbd-client -d "$NBD_DEV"
echo "  nbd-client -d on the dead connection: exit $RC"
unload_module
