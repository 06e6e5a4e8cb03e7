#!/bin/sh
# clone-partition-via-disk: while partition vda1 is cloned and its regions are in sync, the same
# sectors are written through the whole disk /dev/vda. Those writes change the source's data as
# much as writes through /dev/vda1 do: the filter must see and mirror them (or fail the
# migration). Then the migration switches and the target must hold them.
# disks: 128M 128M
# needs: module migrate
# timeout: 240
. /tests/lib.sh
. /tests/live-lib.sh

clone_partition_in_sync
synced=$(status_field /dev/vda1 regions_synced)
[ "${synced:-0}" -ge 14 ] || fail "only ${synced:-?} of 16 regions in sync after --no-switch"
m0=$(status_field /dev/vda1 writes_mirrored)

step "write region 1 of vda1 through /dev/vda (sectors 4096..6143 of the disk)"
direct_io /dev/vda 4096 W 2048 65536
m1=$(status_field /dev/vda1 writes_mirrored)
echo "  writes_mirrored: $m0 -> $m1, mode $(status_mode /dev/vda1)"

step "migrate start /dev/vda1 /dev/vdb: switch"
run_capture migrate start /dev/vda1 /dev/vdb --max-pause 500ms
if [ "$RC" -ne 0 ]; then
	grep -q '^switched:' "$OUT" "$ERR" && fail "migrate says it switched, yet exited $RC"
	expect_pattern /dev/vda1 2048 W 2048
	echo "  the migration failed (exit $RC) and the source holds the write"
else
	[ "${m1:-0}" -gt "${m0:-0}" ] || fail "the write through /dev/vda was not mirrored (writes_mirrored $m0 -> $m1)"
	must migrate detach /dev/vda1
	drop_caches
	expect_pattern /dev/vdb 2048 W 2048
	expect_pattern /dev/vdb 0 A 2048
fi
unload_module
