# Helpers for the scenarios that migrate a whole partitioned disk and reboot
# (tests/vm/scenarios/migrate-{mbr,gpt}-reboot.sh). Sourced after lib.sh and live-lib.sh.
#
# Boot 1: parts_begin LABEL partitions /dev/vda (sfdisk, LABEL dos or gpt: vda1 96 MiB, vda2 the
# rest), puts ext4 on both, mounts vda1 on /mnt/src under the acknowledging stampwriter and vda2
# on /mnt/other with files of known content and a second stampwriter (a 4 MiB file), and keeps
# the identifiers (UUID, PARTUUID, the table's label-id) on /notes. parts_migrate migrates the whole /dev/vda to /dev/vdb with both
# partitions busy and checks the redirect.
# Boot 2: parts_check_* look at what the kernel, blkid, sfdisk and migrate find.

PARTS_SRC=/dev/vda
PARTS_TGT=/dev/vdb

# part_id DEV TAG: one identifier blkid reads from DEV (UUID, PARTUUID...), empty if none
part_id() {
	blkid -p -s "$2" -o value "$1" 2>/dev/null | head -n1
}

# devices_with TOKEN: every device blkid finds for TOKEN (NAME=value), sorted, on one line.
# blkid -t scans every block device in /proc/partitions (no cache in the guest).
devices_with() {
	blkid -c /dev/null -t "$1" -o device 2>/dev/null | sort | tr '\n' ' ' | sed 's/ $//'
}

# expect_found TOKEN DEV: exactly DEV carries TOKEN
expect_found() {
	expect_eq "$(devices_with "$1")" "$2" "devices blkid finds for $1"
	echo "  $1 -> $2"
}

# parts_begin LABEL: boot 1, before the migration (see the top of this file)
parts_begin() {
	live_prepare
	command -v sfdisk >/dev/null || fail "sfdisk is not in the initramfs (util-linux fdisk package on the host)"
	step "partition $PARTS_SRC ($1): vda1 96 MiB, vda2 the rest"
	printf 'label: %s\n,96M,L\n,,L\n' "$1" | sfdisk -q "$PARTS_SRC" >/tmp/sfdisk.out 2>&1 ||
		fail "sfdisk $PARTS_SRC failed: $(errtail /tmp/sfdisk.out)"
	wait_until 10 "/dev/vda1 and /dev/vda2" test -b /dev/vda2 -a -b /dev/vda1
	sfdisk -d "$PARTS_SRC" | sed 's/^/  /'
	note label "$1"
	note label_id "$(sfdisk --disk-id "$PARTS_SRC")"
	note start1 "$(cat /sys/block/vda/vda1/start)"

	step "vda2: ext4 with files, busy under a second stampwriter"
	must mkfs.ext4 -q -F /dev/vda2
	must mount -t ext4 /dev/vda2 /mnt/other
	rm -f /tmp/md5s
	_i=1
	while [ $_i -le 8 ]; do
		must make_file /mnt/other/f$_i $((_i * 256))
		_i=$((_i + 1))
	done
	sync
	cp /tmp/md5s /notes/other.md5
	sync -f /notes/other.md5
	stampwriter write /mnt/other/stamp.dat /tmp/sw2.log --blocks 1024 --stop /tmp/sw2.stop \
		--gap-us 1000 >/tmp/sw2.out 2>&1 &
	SW2_PID=$!
	wait_until 120 "the second stampwriter to stamp its blocks" _sw2_ready

	step "vda1: ext4, mounted on /mnt/src, busy under the acknowledging stampwriter"
	crash_writer_begin /dev/vda1

	step "identifiers, found on the source before the migration"
	for _p in 1 2; do
		_u=$(part_id /dev/vda$_p UUID)
		_pu=$(part_id /dev/vda$_p PART_ENTRY_UUID)
		[ -n "$_u" ] || fail "blkid finds no filesystem UUID on /dev/vda$_p"
		[ -n "$_pu" ] || fail "blkid finds no partition UUID on /dev/vda$_p"
		note uuid$_p "$_u"
		note partuuid$_p "$_pu"
		# What the next boot must find on the target, the source would be found by today.
		expect_found "UUID=$_u" /dev/vda$_p
		expect_found "PARTUUID=$_pu" /dev/vda$_p
	done
}

_sw2_ready() {
	kill -0 "$SW2_PID" 2>/dev/null || fail "the second stampwriter exited early: $(errtail /tmp/sw2.out)"
	grep -q 'blocks stamped' /tmp/sw2.out
}

# parts_migrate: the whole source disk, both partitions mounted and busy, migrates and switches;
# writes to the partitions are redirected; then vda2's writer stops (no write failed), its
# writes are synced and its log kept on /notes: the next boot checks every last stamp
parts_migrate() {
	live_start "$PARTS_SRC" "$PARTS_TGT" --max-pause 500ms --state-dir "$CRASH_STATE"
	kill -0 "$SW2_PID" 2>/dev/null || fail "the second stampwriter died: $(errtail /tmp/sw2.out)"
	redirect_writes "$PARTS_SRC" 3
	step "vda2's writer stops; its writes are synced"
	touch /tmp/sw2.stop
	wait "$SW2_PID" || fail "the second stampwriter failed: $(errtail /tmp/sw2.out)"
	sed 's/^/  /' /tmp/sw2.out
	sync
	cp /tmp/sw2.log /notes/sw2.log
	sync -f /notes/sw2.log
}

# parts_clean_detach: the stampwriter on vda1 stops (its log kept on /notes), both partitions
# are unmounted and blkmig is detached from the whole disk
parts_clean_detach() {
	step "clean shutdown: stop the writer, umount, detach"
	sw_stop
	cp "$SW_LOG" /notes/sw.log
	must umount /mnt/src
	must umount /mnt/other
	run_capture migrate detach "$PARTS_SRC"
	[ "$RC" -eq 0 ] || fail "migrate detach $PARTS_SRC failed (exit $RC): $(errtail "$ERR")"
	expect_no_filter "$PARTS_SRC"
}

# parts_check_kernel: the kernel's partition scan at this boot found both partitions on the
# target and none on the retired source
parts_check_kernel() {
	step "the kernel's partition scan: vdb1 and vdb2, nothing on vda"
	grep -E ' vd[ab][0-9]*$' /proc/partitions | sed 's/^/  /'
	for _p in 1 2; do
		[ -d /sys/block/vdb/vdb$_p ] || fail "the kernel found no vdb$_p on the target"
		[ -b /dev/vdb$_p ] || fail "/dev/vdb$_p does not exist"
	done
	_found=
	for _d in /sys/block/vda/vda*; do
		[ -e "$_d" ] && _found="$_found ${_d##*/}"
	done
	[ -z "$_found" ] || fail "the kernel found partitions on the retired source: $_found"
	grep -qE ' vda[0-9]+$' /proc/partitions && fail "/proc/partitions lists a partition of vda"
	dmesg | grep -E ' vd[ab]:' | sed 's/^/  dmesg: /'
}

# parts_check_source: the retired source: no filesystem or partition table for blkid or
# sfdisk, and it does not mount; what stays on it is printed and checked: the filesystem that
# was vda1 lies intact beyond the retired head (with its UUID), and for GPT the backup header
# still sits in the last sector (unless an earlier boot noted backup_wiped)
parts_check_source() {
	not_recognisable "$PARTS_SRC"
	echo "  blkid -p -o udev $PARTS_SRC: $(blkid -p -o udev "$PARTS_SRC" 2>&1 | tr '\n' ' ')"
	step "sfdisk finds no partition table on $PARTS_SRC"
	run_capture sfdisk -d "$PARTS_SRC"
	[ "$RC" -ne 0 ] || fail "sfdisk reads a partition table on the retired source: $(head -c 300 "$OUT" | tr '\n' ' ')"
	grep -q 'does not contain a recognized partition table' "$ERR" ||
		fail "sfdisk -d $PARTS_SRC failed for another reason: $(errtail "$ERR")"
	dd if="$PARTS_SRC" bs=4096 count=1 iflag=direct 2>/dev/null | head -c 14 | grep -qa 'BLKMIG-RETIRED' ||
		fail "$PARTS_SRC does not start with the retire marker"

	step "what stays on the retired source beyond its head"
	_s1=$(noted start1)
	[ $((_s1 * 512)) -ge 1048576 ] || fail "vda1 started at sector $_s1, inside the retired head"
	_sb=$((_s1 + 2)) # the ext4 superblock: 1024 bytes into the partition
	_magic=$(dd if="$PARTS_SRC" bs=512 skip=$_sb count=1 iflag=direct 2>/dev/null | od -An -tx1 -j56 -N2 | tr -d ' \n')
	_uuid=$(dd if="$PARTS_SRC" bs=512 skip=$_sb count=1 iflag=direct 2>/dev/null | od -An -tx1 -j104 -N16 | tr -d ' \n')
	expect_eq "$_magic" 53ef "ext4 magic of the old vda1 at sector $_sb of $PARTS_SRC"
	expect_eq "$_uuid" "$(noted uuid1 | tr -d '-')" "UUID of the old vda1's superblock on $PARTS_SRC"
	echo "  sector $_sb: the old vda1's ext4 superblock, UUID $(noted uuid1), no partition leads to it"
	_last=$(($(dev_sectors "$PARTS_SRC") - 1))
	_sig=$(dd if="$PARTS_SRC" bs=512 skip=$_last count=1 iflag=direct 2>/dev/null | head -c 8)
	if [ "$(noted backup_wiped)" = yes ]; then
		[ "$_sig" = "EFI PART" ] && fail "the GPT backup header of $PARTS_SRC is back after wipefs"
		echo "  last sector ($_last): no GPT backup header (wiped)"
	elif [ "$(noted label)" = gpt ]; then
		expect_eq "$_sig" "EFI PART" "signature of the last sector of $PARTS_SRC (the GPT backup header)"
		echo "  last sector ($_last): the GPT backup header, ignored without a protective MBR"
	else
		echo "  last sector ($_last): '$_sig' (MBR: no backup)"
	fi
}

# parts_check_target: the target carries the partition table (same label-id, sfdisk --verify
# clean), and every UUID and PARTUUID resolves to the target's partition and nothing else
parts_check_target() {
	step "the target's partition table"
	run_capture sfdisk -d "$PARTS_TGT"
	[ "$RC" -eq 0 ] || fail "sfdisk -d $PARTS_TGT failed: $(errtail "$ERR")"
	grep -q "^label: $(noted label)\$" "$OUT" || fail "the target's table is not $(noted label)"
	expect_eq "$(sfdisk --disk-id "$PARTS_TGT")" "$(noted label_id)" "label-id of the target's table"
	run_capture sfdisk --verify "$PARTS_TGT"
	if [ "$RC" -ne 0 ] || ! grep -q '^No errors detected' "$OUT"; then
		fail "sfdisk --verify $PARTS_TGT: $(errtail "$OUT") $(errtail "$ERR")"
	fi

	step "UUID and PARTUUID find the target's partitions, and nothing on the source"
	for _p in 1 2; do
		expect_found "UUID=$(noted uuid$_p)" /dev/vdb$_p
		expect_found "PARTUUID=$(noted partuuid$_p)" /dev/vdb$_p
	done
	expect_eq "$(blkid -U "$(noted uuid1)")" /dev/vdb1 "blkid -U $(noted uuid1)"
	expect_eq "$(findfs "UUID=$(noted uuid1)" 2>&1)" /dev/vdb1 "busybox findfs UUID=$(noted uuid1)"
}

# parts_check_data: vdb1, resolved by its UUID, mounts, is fsck-clean and holds every
# acknowledged stamp; vdb2, resolved by its PARTUUID, is fsck-clean and holds its files and
# every last stamp of vda2's writer
parts_check_data() {
	_d1=$(blkid -U "$(noted uuid1)")
	_d2=$(blkid -c /dev/null -t "PARTUUID=$(noted partuuid2)" -o device)
	expect_eq "$_d1" /dev/vdb1 "the device of UUID=$(noted uuid1)"
	expect_eq "$_d2" /dev/vdb2 "the device of PARTUUID=$(noted partuuid2)"
	after_crash_fs "$_d1"
	step "$_d2 (PARTUUID=$(noted partuuid2)): fsck, mount, every file of vda2"
	fsck_clean "$_d2"
	must mount -t ext4 "$_d2" /mnt/other
	check_md5s /notes/other.md5
	stampwriter verify /mnt/other/stamp.dat /notes/sw2.log >/tmp/swv2.out 2>&1 ||
		fail "vda2's writer: stampwriter verify on $_d2 failed: $(errtail /tmp/swv2.out)"
	sed 's/^/  /' /tmp/swv2.out
	must umount /mnt/other
}

# parts_check_status: `migrate status` reads the retired whole disk with no filter attached
parts_check_status() {
	step "migrate status (no filter): the source retired, the target authoritative"
	offline_state "$PARTS_SRC"
	expect_eq "$OFFLINE_STATE" retired "offline state of $PARTS_SRC (no target named)"
	grep -q source-head.bin "$OUT" || fail "migrate status does not name the saved head: $(head -c 300 "$OUT")"
	expect_offline_state "$PARTS_SRC" "$PARTS_TGT" target_authoritative
}

# parts_boot2: every check of the second boot
parts_boot2() {
	live_prepare
	parts_check_kernel
	parts_check_source
	parts_check_target
	parts_check_status
	parts_check_data
}
