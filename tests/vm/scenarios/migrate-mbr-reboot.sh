#!/bin/sh
# migrate-mbr-reboot: a whole MBR-partitioned disk is migrated live while both of its ext4
# partitions are mounted and busy (vda1 under the acknowledging stampwriter, vda2 under a second
# stampwriter); the switch retires the old disk's partition table with its head. After umount and
# detach, a re-read of both tables already shows the partitions on vdb only; then a clean
# reboot. Second boot: the kernel finds vdb1 and vdb2 and nothing on vda; blkid and sfdisk find
# no filesystem or table on vda, which does not mount; each UUID and PARTUUID (which the source
# carried before the switch) resolves to the target's partition and to nothing else; vdb1,
# mounted through its UUID, holds every last stamp, vdb2, through its PARTUUID, its files and
# last stamps; both are fsck-clean; `migrate status` says retired / target_authoritative for
# the whole disk.
# disks: 160M 160M
# needs: module migrate
# boots: 2
# timeout: 420
. /tests/lib.sh
. /tests/live-lib.sh
. /tests/parts-lib.sh

if [ "$BLKMIG_BOOT" = 1 ]; then
	parts_begin dos
	parts_migrate
	parts_clean_detach
	step "re-read both partition tables: the partitions are on vdb only"
	must blockdev --rereadpt "$PARTS_SRC"
	must blockdev --rereadpt "$PARTS_TGT"
	wait_until 10 "/dev/vdb2 after re-reading vdb's table" test -b /dev/vdb2
	[ -e /sys/block/vda/vda1 ] && fail "vda1 is still there after re-reading the retired vda's table"
	[ -d /sys/block/vdb/vdb1 ] || fail "no vdb1 after re-reading vdb's table"
	sync
	# The end of the scenario's first boot: /init reboots cleanly (no reset).
	exit 0
fi

step "boot 2, after a clean reboot"
parts_boot2
step "every block of the writer's file holds its last stamp"
must mount -t ext4 "$(blkid -U "$(noted uuid1)")" /mnt/src
# shellcheck disable=SC2034 # read by sw_verify (live-lib.sh)
SW_LOG=/notes/sw.log
sw_verify /mnt/src/stamp.dat
must umount /mnt/src
echo "ok: the MBR disk's partitions are found on the target only, by UUID and PARTUUID"
