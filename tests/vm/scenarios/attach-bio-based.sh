#!/bin/sh
# attach-bio-based: a bio-based source (a dm-linear device) is refused with a message that says
# why (the writes such a driver has in flight when the filter attaches cannot be waited for, so a
# live migration could miss one), naming EMEDIUMTYPE, and nothing changes: no filter, the source's
# data and the target's pattern are intact. A bio-based target (dm) is fine (clone-target-fails).
# disks: 128M 128M
# needs: module migrate
# timeout: 120
. /tests/lib.sh
export DM_DISABLE_UDEV=1

load_module
ssz=$(dev_sectors /dev/vda)
must dmsetup create src --table "0 $ssz linear /dev/vda 0"
write_pattern /dev/mapper/src 0 SRC 2048
write_pattern /dev/vdb 0 TGT 2048
for cmd in attach start; do
	step "migrate $cmd /dev/mapper/src /dev/vdb is refused"
	expect_errno EMEDIUMTYPE migrate $cmd /dev/mapper/src /dev/vdb
	grep -qi 'bio-based' "$ERR" || fail "the refusal does not say the source is bio-based: $(head -c 300 "$ERR" | tr '\n' ' ')"
	expect_no_filter /dev/mapper/src
done
expect_pattern /dev/mapper/src 0 SRC 2048
expect_pattern /dev/vdb 0 TGT 2048
must dmsetup remove src
unload_module
