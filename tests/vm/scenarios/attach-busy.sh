#!/bin/sh
# attach-busy: a device has at most one filter. A second attach on an attached source fails
# with EBUSY/EALREADY (same target or another one) and a message; the target is held
# exclusively (no second migration into it, no mkfs on it); the first filter keeps working
# (I/O passes, status, detach), and after the detach everything is free again.
# disks: 256M 256M 256M
# needs: module migrate
# timeout: 180
. /tests/lib.sh

load_module
write_pattern /dev/vda 0 BEFORE 8192

step "first attach vda -> vdb"
run_capture migrate attach /dev/vda /dev/vdb --region-size 1M
[ "$RC" -eq 0 ] || fail "migrate attach /dev/vda /dev/vdb failed (exit $RC): $(head -c 300 "$ERR" | tr '\n' ' ')"
expect_mode /dev/vda clone

step "second attach on the same source is refused"
expect_errno 'EBUSY|EALREADY' migrate attach /dev/vda /dev/vdc
expect_errno 'EBUSY|EALREADY' migrate attach /dev/vda /dev/vdb
expect_mode /dev/vda clone

step "the target is held exclusively"
expect_errno 'EBUSY' migrate attach /dev/vdc /dev/vdb
expect_no_filter /dev/vdc
run_capture mkfs.ext4 -q /dev/vdb
[ "$RC" -ne 0 ] || fail "mkfs.ext4 on the attached target /dev/vdb succeeded; the target must be held exclusively"

step "the first filter keeps working"
expect_pattern /dev/vda 0 BEFORE 8192
write_pattern /dev/vda 1024 DURING 4096
expect_pattern /dev/vda 1024 DURING 4096
expect_pattern /dev/vda 0 BEFORE 1024
must mkfs.ext4 -q -F /dev/vda
must mount -t ext4 /dev/vda /mnt/src
for i in 1 2 3 4; do make_file /mnt/src/f$i 256 || fail "write f$i while attached"; done
must umount /mnt/src
expect_mode /dev/vda clone

step "detach"
run_capture migrate detach /dev/vda
[ "$RC" -eq 0 ] || fail "migrate detach /dev/vda failed (exit $RC): $(head -c 300 "$ERR" | tr '\n' ' ')"
expect_no_filter /dev/vda
recheck_from_disk /dev/vda check_md5s

step "after detach: source and target are free"
must mkfs.ext4 -q -F /dev/vdb
run_capture migrate attach /dev/vda /dev/vdc
[ "$RC" -eq 0 ] || fail "attach after detach failed (exit $RC): $(head -c 300 "$ERR" | tr '\n' ' ')"
expect_mode /dev/vda clone
must migrate detach /dev/vda
expect_no_filter /dev/vda
unload_module
echo ok
