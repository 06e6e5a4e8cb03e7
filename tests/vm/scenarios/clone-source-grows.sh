#!/bin/sh
# clone-source-grows: the source (partition vda1, raw, 16 MiB) is in sync but for its boundary
# regions when it grows to 32 MiB and its new tail is written. The region map covers the size
# at attach, so those writes are neither tracked nor mirrored: the migration must fail with a
# reason that says the source changed size (nothing retired, the source intact), or carry the new
# tail over. A switch with exit 0 and the tail missing on the target is the failure caught here.
# disks: 128M 128M
# needs: module migrate
# timeout: 240
. /tests/lib.sh
. /tests/live-lib.sh

clone_partition_in_sync

step "grow vda1 to 32 MiB and write its new tail"
must resizepart /dev/vda 1 65536
expect_eq "$(dev_sectors /dev/vda1)" 65536 "size of vda1 after resizepart"
direct_io /dev/vda1 32768 TAIL 32768 65536
echo "  mode now: $(status_mode /dev/vda1)"

step "migrate start /dev/vda1 /dev/vdb: switch, or fail naming the size change"
run_capture migrate start /dev/vda1 /dev/vdb --max-pause 500ms
if [ "$RC" -ne 0 ]; then
	grep -qiE 'size|grew|grown|capacity|resiz' "$ERR" ||
		fail "migrate failed (exit $RC) without naming the size change: $(head -c 300 "$ERR" | tr '\n' ' ')"
	grep -q '^switched:' "$OUT" "$ERR" && fail "migrate says it switched, yet exited $RC"
	migrate detach /dev/vda1 >/dev/null 2>&1
	expect_no_filter /dev/vda1
	expect_pattern /dev/vda1 0 A 32768
	expect_pattern /dev/vda1 32768 TAIL 32768
else
	grep -q '^switched:' "$OUT" "$ERR" || fail "migrate exited 0 without switching"
	must migrate detach /dev/vda1
	drop_caches
	expect_pattern /dev/vdb 0 A 32768
	expect_pattern /dev/vdb 32768 TAIL 32768
fi
unload_module
