#!/bin/sh
# clone-polled-io: polled I/O (io_uring with IOPOLL, REQ_POLLED bios) on a virtio disk with a poll
# queue, through CLONE, the switch and REDIRECT. An unprivileged user polls reads of region 0 (the
# region the switch waits for before it retires the source) all the time, and the writer rewrites
# the raw device with polled writes. Clones must not carry REQ_POLLED (nobody polls their queue):
# every read and write completes, the switch happens, no read or write waits longer than the hold
# timeout + 1 s, and every stamp verifies on the target.
# disks: 96M:num-queues=2 96M:num-queues=2
# append: virtio_blk.poll_queues=1
# needs: module migrate
# timeout: 300
. /tests/lib.sh
. /tests/live-lib.sh

live_prepare
expect_eq "$(cat /sys/block/vda/queue/io_poll)" 1 "io_poll of vda (virtio_blk.poll_queues=1)"

step "an unprivileged polled reader of region 0, a polled writer on the raw device"
chmod o+r /dev/vda
rm -f /tmp/pr.stop
su -s /bin/sh user -c "stampwriter poll-read /dev/vda --offset 0 --len 4096 --stop /tmp/pr.stop" >/tmp/pr.out 2>&1 &
reader=$!
SW_BLOCKS=4096
SW_ARGS="--io uring-poll --gap-us 300"
sw_start /dev/vda
sleep 1
kill -0 $reader 2>/dev/null || fail "the polled reader died: $(errtail /tmp/pr.out)"

live_start /dev/vda /dev/vdb --hold-timeout-ms 2000 --max-pause 500ms
expect_mode /dev/vda redirect
sleep 2
sw_alive
kill -0 $reader 2>/dev/null || fail "the polled reader died: $(errtail /tmp/pr.out)"

step "stop; both exit cleanly; detach; the target holds every stamp"
touch /tmp/pr.stop
wait $reader || fail "the polled reader failed: $(errtail /tmp/pr.out)"
cat /tmp/pr.out
sw_stop
must migrate detach /dev/vda
expect_no_filter /dev/vda
sw_verify /dev/vdb
rmax=$(sed -n 's/.*longest \([0-9.]*\) ms.*/\1/p' /tmp/pr.out)
ok=$(echo "$SW_MAX_MS ${rmax:-99999}" | awk '{ print ($1 <= 3000 && $2 <= 3000) ? "yes" : "no" }')
[ "$ok" = yes ] || fail "a polled write waited $SW_MAX_MS ms or a polled read ${rmax:-?} ms: more than the 2000 ms hold timeout + 1 s"
unload_module
