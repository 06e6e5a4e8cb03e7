#!/bin/sh
# retire-unplug: after the switch, the source disk (vda) is hot-removed (PCI remove) while its
# ext4 stays mounted and written. The filter keeps the removed device: the filesystem is not shut
# down, no write fails, the writer's blocks and 40 MiB of buffered writes (dirty limit 8 MiB: the
# removed disk's writeback must keep working) land on the target, and sync returns. Unmounting,
# the last close of the removed device, detaches the filter before umount returns and frees
# everything (rmmod works). The target then holds the filesystem, fsck-clean, every stamp and the
# buffered file intact.
# disks: 160M 160M
# needs: module migrate
# timeout: 420
. /tests/lib.sh
. /tests/live-lib.sh

UNPLUG=sysfs
unplug_flow
echo "ok: the source was unplugged under a mounted, busy filesystem; the target serves it"
