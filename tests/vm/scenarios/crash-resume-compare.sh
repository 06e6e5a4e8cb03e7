#!/bin/sh
# crash-resume-compare: the machine resets (no sync, no unmount) while `migrate start` copies,
# with about 85% of the regions in sync. Second boot: nothing is attached; the filesystem is
# mounted and written again, and a new `migrate start` copies only what the target lacks: it
# compares the regions the first boot already copied and commits them without writing, so its
# JSON summary reports at most a quarter of the device written. It switches, and the target
# holds the filesystem with every last stamp.
# disks: 256M 256M
# needs: module migrate
# boots: 2
# timeout: 600
. /tests/lib.sh
. /tests/live-lib.sh

SW_BLOCKS=512
_attached() {
	[ -n "$(status_field /dev/vda regions_total)" ]
}

if [ "$BLKMIG_BOOT" = 1 ]; then
	live_prepare
	step "ext4 on /dev/vda, filled with 180 MiB of random data"
	must mkfs.ext4 -q -F /dev/vda
	must mount -t ext4 /dev/vda /mnt/src
	must make_file /mnt/src/fill.bin 184320
	must sync
	step "migrate start --rate-limit 8M in the background; reset at ~85% in sync"
	migrate start /dev/vda /dev/vdb --rate-limit 8M >/tmp/mig1.log 2>&1 &
	wait_until 60 "blkmig attached to /dev/vda" _attached
	total=$(status_field /dev/vda regions_total)
	wait_synced /dev/vda $((total * 85 / 100)) 240
	expect_mode /dev/vda clone
	synced=$(status_field /dev/vda regions_synced)
	echo "  $synced of $total regions in sync"
	note synced "$synced"
	note fill_md5 "$(md5sum /mnt/src/fill.bin | cut -d' ' -f1)"
	hard_reset
fi

step "boot 2, after a reset at $(noted synced) regions in sync"
live_prepare
expect_no_filter /dev/vda
must mount -t ext4 /dev/vda /mnt/src
sw_start /mnt/src/stamp.dat
live_start /dev/vda /dev/vdb --max-pause 300ms --json
done_line=$(grep '"event":"done"' "$MIG_LOG" | tail -n1)
echo "  summary: $done_line"
written=$(echo "$done_line" | sed -n 's/.*"bytes_copied":\([0-9]*\).*/\1/p')
matched=$(echo "$done_line" | sed -n 's/.*"bytes_matched":\([0-9]*\).*/\1/p')
[ -n "$written" ] && [ -n "$matched" ] || fail "no bytes_copied or bytes_matched in the summary: $done_line"
size=$(($(dev_sectors /dev/vda) * 512))
echo "  written $written of $size bytes, $matched committed by comparison"
[ "$written" -le $((size / 4)) ] || fail "the resumed migration wrote $written bytes, more than a quarter of the $size-byte device"
[ "$matched" -ge $((size / 2)) ] || fail "only $matched bytes were committed by comparison"
live_finish /dev/vda /dev/vdb
step "the filler file on the target"
must mount -t ext4 -o ro /dev/vdb /mnt/tgt
expect_eq "$(md5sum /mnt/tgt/fill.bin | cut -d' ' -f1)" "$(noted fill_md5)" "md5 of fill.bin on the target"
must umount /mnt/tgt
unload_module
