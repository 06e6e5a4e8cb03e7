#!/bin/sh
# attach-rmmod-detach: while blkmig is attached to a mounted, busy ext4 (CLONE, the copy running),
# rmmod is refused and changes nothing; then detach in CLONE (an abort) under the mounted
# filesystem loses nothing: the writer never sees an error, and the source is fsck-clean with
# every stamp. After the detach rmmod works.
# disks: 160M 160M
# needs: module migrate
# timeout: 300
. /tests/lib.sh
. /tests/live-lib.sh

live_begin /dev/vda
step "migrate start (copy slowed to ~8 MiB/s); rmmod while attached"
migrate start /dev/vda /dev/vdb --rate-limit 8M --full-copy >/tmp/mig.log 2>&1 &
mig=$!
wait_synced /dev/vda 8 120
run_capture rmmod blkmig
[ "$RC" -ne 0 ] || fail "rmmod blkmig succeeded while a filter was attached"
[ -d /sys/module/blkmig ] || fail "the module is gone after a refused rmmod"
expect_mode /dev/vda clone
sw_alive

step "detach in CLONE under the mounted filesystem"
kill -9 $mig
wait $mig
must migrate detach /dev/vda
expect_no_filter /dev/vda
sleep 1
sw_alive
sw_stop
must umount /mnt/src
recheck_from_disk /dev/vda "sw_verify $SW_FILE"
unload_module
