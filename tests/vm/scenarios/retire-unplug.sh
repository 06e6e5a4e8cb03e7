#!/bin/sh
# retire-unplug: after the switch, the source disk (vda) is hot-removed (PCI remove) while its
# ext4 stays mounted and written. The filter keeps the removed device: the filesystem is not shut
# down, no write fails, the writer's blocks and 40 MiB of buffered writes (dirty limit 8 MiB: the
# removed disk's writeback must keep working) land on the target, and sync returns. Unmounting,
# the last close of the removed device, detaches the filter and frees everything (rmmod works).
# The target then holds the filesystem, fsck-clean, every stamp and the buffered file intact.
# disks: 160M 160M
# needs: module migrate
# timeout: 420
. /tests/lib.sh
. /tests/live-lib.sh

HOT=100
SW_ARGS="--hot $HOT --gap-us 500"
live_begin /dev/vda
refs0=$(module_refs)
live_start /dev/vda /dev/vdb --max-pause 200ms
expect_mode /dev/vda redirect
unplug_served /dev/vda /dev/vdb /mnt/src

step "stop the writer: no write failed"
sw_stop
last_close_detaches /mnt/src "$refs0"

live_check_target /dev/vdb
must mount -t ext4 /dev/vdb /mnt/tgt
expect_eq "$(md5sum /mnt/tgt/buffered.dat | cut -d' ' -f1)" "$UNPLUG_BUF_MD5" "md5 of the buffered file on the target"
must umount /mnt/tgt
unload_module
echo "ok: the source was unplugged under a mounted, busy filesystem; the target serves it"
