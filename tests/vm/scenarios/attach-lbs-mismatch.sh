#!/bin/sh
# attach-lbs-mismatch: a target whose logical block size (4096) is larger than the source's (512)
# is refused, with a message naming both sizes, and nothing changes: no filter is attached, the
# target's first and last MiB keep their pattern, and 512-byte O_DIRECT writes to the source
# still work. (Accepted, such a target fails the first 512-byte write, and after a switch every
# 512-byte I/O returns EIO.)
# disks: 128M 256M:logical_block_size=4096,physical_block_size=4096
# needs: module migrate
# timeout: 180
. /tests/lib.sh

load_module
expect_eq "$(cat /sys/block/vda/queue/logical_block_size)" 512 "logical block size of vda"
expect_eq "$(cat /sys/block/vdb/queue/logical_block_size)" 4096 "logical block size of vdb"
tsz=$(dev_sectors /dev/vdb)
write_pattern /dev/vdb 0 HEAD 2048
write_pattern /dev/vdb $((tsz - 2048)) TAIL 2048
write_pattern /dev/vda 0 SRC 2048

for cmd in attach start; do
	step "migrate $cmd /dev/vda /dev/vdb is refused"
	expect_errno 'E[A-Z0-9]+' migrate $cmd /dev/vda /dev/vdb
	grep -q 512 "$ERR" && grep -q 4096 "$ERR" ||
		fail "the refusal does not name both block sizes (512, 4096): $(head -c 300 "$ERR" | tr '\n' ' ')"
	expect_no_filter /dev/vda
done

step "nothing changed"
expect_pattern /dev/vdb 0 HEAD 2048
expect_pattern /dev/vdb $((tsz - 2048)) TAIL 2048
direct_io /dev/vda 0 ONE 7
expect_pattern /dev/vda 0 ONE 7
unload_module
