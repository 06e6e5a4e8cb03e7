#!/bin/sh
# clone-partition-via-disk: while partition vda1 is cloned, the same sectors are written through
# the whole disk /dev/vda, into a region already in sync. Those writes change the source's data
# as much as writes through /dev/vda1 do: the filter must see and mirror them (or fail the
# migration). Then the migration switches and the target must hold them.
# disks: 128M 128M
# needs: module migrate
# timeout: 240
. /tests/lib.sh
. /tests/live-lib.sh

load_module
write_mbr /dev/vda 2048 32768
[ -b /dev/vda1 ] || fail "/dev/vda1 did not appear"
direct_io /dev/vda1 0 A 32768 65536

step "migrate start /dev/vda1 /dev/vdb (1 MiB regions), the copy slowed to ~2 MiB/s"
migrate start /dev/vda1 /dev/vdb --rate-limit 2M --max-pause 500ms >/tmp/mig.log 2>&1 &
mig=$!
wait_synced /dev/vda1 4 60

step "write region 1 of vda1 through /dev/vda (sectors 4096..6143 of the disk)"
direct_io /dev/vda 4096 W 2048 65536
wait $mig
rc=$?
sed 's/^/  migrate: /' /tmp/mig.log | tail -n 8
if [ $rc -ne 0 ]; then
	grep -q '^switched:' /tmp/mig.log && fail "migrate says it switched, yet exited $rc"
	expect_pattern /dev/vda1 2048 W 2048
	echo "  the migration failed (exit $rc) and the source holds the write"
else
	grep -q '^switched:' /tmp/mig.log || fail "migrate exited 0 without switching"
	must migrate detach /dev/vda1
	drop_caches
	expect_pattern /dev/vdb 2048 W 2048
	expect_pattern /dev/vdb 0 A 2048
fi
unload_module
