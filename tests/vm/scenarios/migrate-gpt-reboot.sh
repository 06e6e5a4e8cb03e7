#!/bin/sh
# migrate-gpt-reboot: a whole GPT-partitioned disk is migrated live while both of its ext4
# partitions are mounted and busy (vda1 under the acknowledging stampwriter, vda2 under a second
# stampwriter); after 3 s of writes through the redirect the machine resets (no sync, no unmount).
# Second boot: the kernel finds vdb1 and vdb2 and nothing on vda, although the old disk still
# ends with its GPT backup header (checked: without a protective MBR the kernel and blkid ignore
# it); blkid and sfdisk find no filesystem or table on vda, which does not mount; each UUID and
# PARTUUID (which the source carried before the switch) resolves to the target's partition
# and to nothing else; the target's GPT verifies (both headers); vdb1, mounted through its
# UUID, holds every acknowledged write, vdb2, through its PARTUUID, its files and last stamps;
# both are fsck-clean; `migrate status` says retired / target_authoritative for the whole disk.
# disks: 160M 160M
# needs: module migrate
# boots: 2
# timeout: 420
. /tests/lib.sh
. /tests/live-lib.sh
. /tests/parts-lib.sh

if [ "$BLKMIG_BOOT" = 1 ]; then
	parts_begin gpt
	parts_migrate
	hard_reset
fi

step "boot 2, after a reset in REDIRECT"
parts_boot2
echo "ok: the GPT disk's partitions are found on the target only, by UUID and PARTUUID"
