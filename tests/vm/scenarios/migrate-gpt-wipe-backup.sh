#!/bin/sh
# migrate-gpt-wipe-backup: the GPT backup header the retire leaves at the end of the old disk,
# with a kernel booted with `gpt` (which reads a GPT without a protective MBR). A whole GPT disk
# is migrated live under two busy ext4 partitions, then unmounted and detached. Re-reading the
# old disk's table brings its partitions back from the backup header: the filesystem UUID is then
# on vda1 and vdb1 at once (the hazard operations.md warns of). `wipefs` lists that header at
# the last sector and `wipefs -a` erases it; after that the old disk has no partition, only vdb1
# carries the UUID, and the retire marker is still there. Second boot, `gpt` still on the
# command line: the kernel finds vdb1 and vdb2 and nothing on vda, whose last sector is no
# longer a GPT header; UUID and PARTUUID resolve to the target only; every write is kept.
# disks: 160M 160M
# needs: module migrate
# boots: 2
# append: gpt
# timeout: 420
. /tests/lib.sh
. /tests/live-lib.sh
. /tests/parts-lib.sh

if [ "$BLKMIG_BOOT" = 1 ]; then
	grep -qw gpt /proc/cmdline || fail "the kernel was not booted with gpt: $(cat /proc/cmdline)"
	parts_begin gpt
	parts_migrate
	parts_clean_detach
	u1=$(noted uuid1)
	last=$(($(dev_sectors "$PARTS_SRC") - 1))

	step "with gpt, re-reading the old disk's table finds its partitions in the backup header"
	must blockdev --rereadpt "$PARTS_TGT"
	wait_until 10 "/dev/vdb2 after re-reading vdb's table" test -b /dev/vdb2
	must blockdev --rereadpt "$PARTS_SRC"
	[ -d /sys/block/vda/vda1 ] ||
		fail "the kernel booted with gpt did not read vda's GPT backup header (no vda1): this scenario's premise is gone"
	wait_until 10 "/dev/vda1 from the backup header" test -b /dev/vda1
	dmesg | grep -E 'GPT|vda:' | tail -n 3 | sed 's/^/  dmesg: /'
	expect_found "UUID=$u1" "/dev/vda1 /dev/vdb1"

	step "wipefs lists the backup header at the last sector and erases it"
	run_capture wipefs -p "$PARTS_SRC"
	[ "$RC" -eq 0 ] || fail "wipefs -p $PARTS_SRC failed: $(errtail "$ERR")"
	grep -qx "$(printf '0x%x' $((last * 512))),,,gpt" "$OUT" ||
		fail "wipefs does not list the GPT backup header at sector $last: $(errtail "$OUT")"
	run_capture wipefs -a "$PARTS_SRC"
	[ "$RC" -eq 0 ] || fail "wipefs -a $PARTS_SRC failed: $(errtail "$ERR")"
	must blockdev --rereadpt "$PARTS_SRC"
	[ -e /sys/block/vda/vda1 ] && fail "vda1 is still there after wipefs -a and a re-read"
	expect_found "UUID=$u1" /dev/vdb1
	[ "$(dd if="$PARTS_SRC" bs=512 skip=$last count=1 iflag=direct 2>/dev/null | head -c 8)" = "EFI PART" ] &&
		fail "the last sector of $PARTS_SRC is still a GPT header after wipefs -a"
	offline_state "$PARTS_SRC"
	expect_eq "$OFFLINE_STATE" retired "offline state of $PARTS_SRC after wipefs -a (the marker stays)"
	note backup_wiped yes
	sync
	exit 0 # /init reboots cleanly
fi

step "boot 2 (gpt on the command line), after wipefs -a and a clean reboot"
grep -qw gpt /proc/cmdline || fail "the kernel was not booted with gpt: $(cat /proc/cmdline)"
parts_boot2
echo "ok: with the backup header wiped, even a kernel booted with gpt finds the target only"
