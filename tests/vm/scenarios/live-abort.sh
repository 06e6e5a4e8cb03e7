#!/bin/sh
# live-abort: a live migration abandoned before the switch leaves the source as it was.
# 1. Ctrl-C (SIGINT) on a rate-limited `migrate start`: it exits non-zero saying the migration
#    was interrupted and abandoned, and blkmig is detached (status: no filter).
# 2. `migrate abort /dev/vda` from another shell while a second `migrate start` copies: abort
#    succeeds ("abandoned"), the filter is gone, and that `migrate start` ends with an error
#    (it does not hang or claim success).
# The writer runs throughout; afterwards the fs on vda is fsck-clean and every block holds its
# last stamp, and vdb (half-copied, boundaries wiped) is not recognisable as ext4.
# disks: 160M 160M
# needs: module migrate
# timeout: 420
. /tests/lib.sh
. /tests/live-lib.sh

live_begin /dev/vda

step "1. migrate start --rate-limit 4M, then SIGINT"
migrate start /dev/vda /dev/vdb --rate-limit 4M --full-copy >/tmp/mig1.log 2>&1 &
mig=$!
wait_synced /dev/vda 4
expect_mode /dev/vda clone
kill -INT $mig
wait $mig
rc=$?
sed 's/^/  migrate: /' /tmp/mig1.log | tail -n 4
[ $rc -ne 0 ] || fail "migrate start exited 0 after SIGINT"
grep -qiE 'interrupted|abandoned' /tmp/mig1.log || fail "migrate start's SIGINT exit does not say interrupted/abandoned: $(errtail /tmp/mig1.log)"
expect_no_filter /dev/vda
sw_alive

step "2. migrate start --rate-limit 4M, then migrate abort from another shell"
migrate start /dev/vda /dev/vdb --rate-limit 4M --full-copy >/tmp/mig2.log 2>&1 &
mig=$!
wait_synced /dev/vda 4
run_capture migrate abort /dev/vda
[ "$RC" -eq 0 ] || fail "migrate abort /dev/vda failed (exit $RC): $(errtail "$ERR")"
grep -q abandoned "$ERR" || fail "migrate abort did not say 'abandoned': $(errtail "$ERR")"
expect_no_filter /dev/vda
# the copier notices at its next ioctl (it may first finish pacing its current batch): 60 s
i=0
while kill -0 $mig 2>/dev/null && [ $i -lt 300 ]; do
	sleep 0.2
	i=$((i + 1))
done
kill -0 $mig 2>/dev/null && fail "migrate start still runs 60 s after migrate abort"
wait $mig
rc=$?
sed 's/^/  migrate: /' /tmp/mig2.log | tail -n 4
[ $rc -ne 0 ] || fail "migrate start exited 0 although its migration was aborted under it"
expect_no_filter /dev/vda
sw_alive

step "writer stops; the source is intact"
sleep 1
sw_stop
must umount /mnt/src
drop_caches
fsck_clean /dev/vda
must mount -t ext4 /dev/vda /mnt/src
sw_verify /mnt/src/stamp.dat
must umount /mnt/src
if blkid -p /dev/vdb 2>/dev/null | grep -q 'TYPE="ext4"'; then
	fail "the abandoned target vdb is recognisable as ext4: $(blkid -p /dev/vdb)"
fi
unload_module
