#!/bin/sh
# live-kill-copier: `migrate start` (rate-limited, so it is still cloning) is killed with
# SIGKILL in the middle of the copy. The filter stays attached in CLONE mode and the writer's
# I/O is not stuck (the hot block's stamp on the disk keeps advancing for 2 s after the kill).
# A new `migrate start` resumes from the regions already in sync and switches; the target then
# holds every last stamp.
# disks: 160M 160M
# needs: module migrate
# timeout: 480
. /tests/lib.sh
. /tests/live-lib.sh

HOT=1000
SW_ARGS="--hot $HOT --gap-us 500"
live_begin /dev/vda

step "migrate start --rate-limit 8M in the background"
migrate start /dev/vda /dev/vdb --rate-limit 8M --full-copy >/tmp/mig1.log 2>&1 &
mig=$!
wait_synced /dev/vda 8
expect_mode /dev/vda clone
synced=$(status_field /dev/vda regions_synced)

step "kill -9 the copier at $synced regions in sync"
kill -9 $mig
wait $mig
echo "  migrate exited with $? (SIGKILL: 137)"
sed 's/^/  migrate: /' /tmp/mig1.log | tail -n 5
expect_mode /dev/vda clone
s0=$(hot_seq "$SW_FILE" $HOT)
sleep 2
sw_alive
s1=$(hot_seq "$SW_FILE" $HOT)
echo "  hot block stamp on disk: $s0 -> $s1 in 2 s after the kill"
[ -n "$s0" ] && [ -n "$s1" ] || fail "could not read the hot block's stamp"
[ "$s1" -gt "$s0" ] || fail "the writer made no progress in 2 s after the copier was killed (hot block stamp $s0 -> $s1): I/O stuck?"
[ "$(status_field /dev/vda writes_held)" = 0 ] || fail "writes are held after the copier died in CLONE"
left=$(status_field /dev/vda regions_synced)
[ "${left:-0}" -ge "$synced" ] || fail "regions in sync went down after the kill: $synced -> $left (only a write conflict may unsync... none should)"

live_start /dev/vda /dev/vdb
grep -q 'resuming the migration' "$MIG_LOG" || fail "the second migrate start did not resume the attached migration: $(errtail "$MIG_LOG")"
live_finish /dev/vda /dev/vdb
unload_module
