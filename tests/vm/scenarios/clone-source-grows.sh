#!/bin/sh
# clone-source-grows: the source (partition vda1, raw, 16 MiB) grows to 32 MiB while it is being
# cloned, and the new tail is written. The filter's region map covers the size at attach, so
# those writes are neither tracked nor mirrored: the migration must fail with a reason that says
# the source changed size (nothing retired, the source intact), or carry the new tail over. A
# switch with exit 0 and the tail missing on the target is the failure this scenario catches.
# disks: 128M 128M
# needs: module migrate
# timeout: 240
. /tests/lib.sh
. /tests/live-lib.sh

load_module
write_mbr /dev/vda 2048 32768
[ -b /dev/vda1 ] || fail "/dev/vda1 did not appear"
direct_io /dev/vda1 0 A 32768 65536

step "migrate start /dev/vda1 /dev/vdb, the copy slowed to ~4 MiB/s"
migrate start /dev/vda1 /dev/vdb --rate-limit 4M --max-pause 500ms >/tmp/mig.log 2>&1 &
mig=$!
wait_synced /dev/vda1 2 60

step "grow vda1 to 32 MiB and write its new tail"
must resizepart /dev/vda 1 65536
expect_eq "$(dev_sectors /dev/vda1)" 65536 "size of vda1 after resizepart"
direct_io /dev/vda1 32768 TAIL 32768 65536

wait $mig
rc=$?
sed 's/^/  migrate: /' /tmp/mig.log | tail -n 12
if [ $rc -ne 0 ]; then
	step "the migration failed (exit $rc): it must say why, and leave the source as it was"
	grep -qiE 'size|grew|grown|capacity|resiz' /tmp/mig.log ||
		fail "migrate failed (exit $rc) without naming the size change: $(tail -c 300 /tmp/mig.log | tr '\n' ' ')"
	grep -q '^switched:' /tmp/mig.log && fail "migrate says it switched, yet exited $rc"
	migrate detach /dev/vda1 >/dev/null 2>&1
	expect_no_filter /dev/vda1
	expect_pattern /dev/vda1 0 A 32768
	expect_pattern /dev/vda1 32768 TAIL 32768
else
	step "the migration switched: the target must hold the grown source, tail included"
	grep -q '^switched:' /tmp/mig.log || fail "migrate exited 0 without switching"
	must migrate detach /dev/vda1
	drop_caches
	expect_pattern /dev/vdb 0 A 32768
	expect_pattern /dev/vdb 32768 TAIL 32768
fi
unload_module
