#!/bin/sh
# retire-unplug-partition: ext4 on the partition vda1 of an MBR disk; the whole disk vda is
# migrated to vdb and switched, then vda is hot-removed (PCI remove) with vda1 mounted and
# written. The filter on the whole disk keeps vda1 too (partitions are dropped with the disk,
# but their opener carries on): no error, the writer and 40 MiB of buffered writes land on the
# target. The last close (umount) detaches the filter. The target has the partition table and
# a fsck-clean vda1 equivalent with every stamp.
# disks: 160M 160M
# needs: module migrate
# timeout: 420
. /tests/lib.sh
. /tests/live-lib.sh

HOT=100
SW_ARGS="--hot $HOT --gap-us 500"
live_prepare
write_mbr /dev/vda 2048 262144
[ -b /dev/vda1 ] || fail "/dev/vda1 did not appear"
live_begin /dev/vda1
refs0=$(module_refs)
live_start /dev/vda /dev/vdb --max-pause 200ms
expect_mode /dev/vda redirect
unplug_served /dev/vda /dev/vdb /mnt/src
[ -b /dev/vda1 ] && fail "/dev/vda1 is still there after the disk was removed"

step "stop the writer: no write failed"
sw_stop
last_close_detaches /mnt/src "$refs0"

step "the target's partition table names its partition"
must blockdev --rereadpt /dev/vdb
wait_until 10 "/dev/vdb1 to appear" test -b /dev/vdb1
live_check_target /dev/vdb1
must mount -t ext4 /dev/vdb1 /mnt/tgt
expect_eq "$(md5sum /mnt/tgt/buffered.dat | cut -d' ' -f1)" "$UNPLUG_BUF_MD5" "md5 of the buffered file on the target"
must umount /mnt/tgt
unload_module
echo "ok: the partitioned source was unplugged under a mounted partition; the target serves it"
