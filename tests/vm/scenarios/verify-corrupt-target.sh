#!/bin/sh
# verify-corrupt-target: `migrate start --verify` over a target that is changed behind the
# filter's back after a region was copied (4 KiB of garbage written straight to vdb, which the
# module holds open but does not own). Before the switch the comparison finds the region, names it
# with its byte range, copies it again and compares it again; the migration switches, the summary
# counts one mismatch, and the target then holds the source's data block by block.
# disks: 160M 160M
# needs: module migrate
# timeout: 420
. /tests/lib.sh
. /tests/live-lib.sh

live_prepare
sectors=$(dev_sectors /dev/vda)
step "pattern A over all of /dev/vda ($sectors sectors, O_DIRECT)"
direct_io /dev/vda 0 A "$sectors" 65536

step "migrate start --verify (copy slowed to ~8 MiB/s), JSON summary"
migrate start /dev/vda /dev/vdb --verify --rate-limit 8M --max-pause 500ms --json >/tmp/mig.out 2>/tmp/mig.err &
mig=$!
wait_synced /dev/vda 40
expect_mode /dev/vda clone

# Region 20 (1 MiB regions) is in sync: its copy is on vdb. Scribble on it.
step "4 KiB of garbage on /dev/vdb in region 20, behind the filter"
dd if=/dev/urandom of=/tmp/junk bs=4096 count=1 2>/dev/null
dd if=/tmp/junk of=/dev/vdb bs=4096 seek=$((20 * 256 + 3)) count=1 oflag=direct conv=notrunc 2>/tmp/dd.err ||
	fail "cannot write behind the filter to /dev/vdb: $(cat /tmp/dd.err)"

wait $mig
rc=$?
sed 's/^/  migrate: /' /tmp/mig.err | tail -n 8
[ $rc -eq 0 ] || fail "migrate start --verify failed (exit $rc): $(errtail /tmp/mig.err)"
grep -q '^switched:' /tmp/mig.err || fail "migrate start --verify did not switch: $(errtail /tmp/mig.err)"
grep -q 'differs from the source.*region=20' /tmp/mig.err ||
	fail "migrate did not report region 20 as different: $(errtail /tmp/mig.err)"
done_line=$(grep '"event":"done"' /tmp/mig.out | tail -n1)
echo "  summary: $done_line"
mism=$(echo "$done_line" | sed -n 's/.*"verify_mismatches":\([0-9]*\).*/\1/p')
expect_eq "$mism" 1 "verify_mismatches in the summary"
echo "$done_line" | grep -q '"mismatched_regions":\[20\]' || fail "mismatched_regions is not [20]: $done_line"
expect_mode /dev/vda redirect

step "detach; the target holds pattern A in every block (the head written by the switch)"
must migrate detach /dev/vda
expect_no_filter /dev/vda
drop_caches
expect_pattern /dev/vdb 0 A "$sectors"
unload_module
