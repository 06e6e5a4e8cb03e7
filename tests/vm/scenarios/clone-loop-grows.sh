#!/bin/sh
# clone-loop-grows: a loop-device source (a 16 MiB file on tmpfs) in sync (--no-switch) grows to
# 32 MiB (the file is extended and `losetup -c` rereads its size) and its new tail is written:
# the migration must fail naming the size change, the source keeping everything; or switch with
# the tail on the target. Never a switch with the tail missing.
# disks: 128M 128M
# needs: module migrate
# timeout: 240
. /tests/lib.sh
. /tests/live-lib.sh

live_prepare
mkdir -p /tmp/lo
must mount -t tmpfs -o size=64m tmpfs /tmp/lo
must truncate -s 16M /tmp/lo/src.img
lo=$(losetup -f)
must losetup "$lo" /tmp/lo/src.img
expect_eq "$(dev_sectors "$lo")" 32768 "size of $lo"
direct_io "$lo" 0 A 32768 65536

step "migrate start $lo /dev/vdb --no-switch"
must migrate start "$lo" /dev/vdb --no-switch
expect_mode "$lo" clone

step "grow the backing file to 32 MiB, losetup -c, write the new tail"
must truncate -s 32M /tmp/lo/src.img
must losetup -c "$lo"
expect_eq "$(dev_sectors "$lo")" 65536 "size of $lo after losetup -c"
direct_io "$lo" 32768 TAIL 32768 65536

step "migrate start $lo /dev/vdb: switch, or fail naming the size change"
run_capture migrate start "$lo" /dev/vdb --max-pause 500ms
if [ "$RC" -ne 0 ]; then
	grep -qiE 'size|grew|grown|capacity|resiz' "$ERR" ||
		fail "migrate failed (exit $RC) without naming the size change: $(head -c 300 "$ERR" | tr '\n' ' ')"
	grep -q '^switched:' "$OUT" "$ERR" && fail "migrate says it switched, yet exited $RC"
	migrate detach "$lo" >/dev/null 2>&1
	expect_no_filter "$lo"
	expect_pattern "$lo" 0 A 32768
	expect_pattern "$lo" 32768 TAIL 32768
else
	grep -q '^switched:' "$OUT" "$ERR" || fail "migrate exited 0 without switching"
	must migrate detach "$lo"
	drop_caches
	expect_pattern /dev/vdb 0 A 32768
	expect_pattern /dev/vdb 32768 TAIL 32768
fi
must losetup -d "$lo"
unload_module
