#!/bin/sh
# live-partition: the source is a partition (/dev/vda2 of a two-partition MBR disk), the target
# the whole /dev/vdb: the live ext4 migration works with partition offsets (the filter sees
# partition-relative sectors), and the neighbouring partition vda1 (a known pattern) and the
# partition table are untouched by the copy, the switch and the retire marker.
# disks: 192M 192M
# needs: module migrate
# timeout: 420
. /tests/lib.sh
. /tests/live-lib.sh

step "partition vda: vda1 16 MiB (pattern), vda2 the rest"
# vda1: sectors 2048..34815; vda2: 34816..end
total=$(dev_sectors /dev/vda)
write_mbr /dev/vda 2048 32768 34816 $((total - 34816))
[ -b /dev/vda2 ] || fail "/dev/vda2 did not appear after re-reading the partition table"
write_pattern /dev/vda1 0 P1 32768
mbr_md5=$(read_md5 /dev/vda 0 1)

live_migrate_flow /dev/vda2 /dev/vdb

step "vda1 and the partition table are untouched"
drop_caches
expect_pattern /dev/vda1 0 P1 32768
expect_eq "$(read_md5 /dev/vda 0 1)" "$mbr_md5" "md5 of vda's MBR"
unload_module
echo "ok: vda2 migrated to vdb, vda1 intact"
