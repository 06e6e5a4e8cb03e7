#!/bin/sh
# attach-refused: attach refuses, with a clear message naming the errno, a target smaller than
# the source, the source as its own target, and a mounted target. After each refusal no filter
# is attached (`migrate status` fails with the "no filter" error), the source's I/O works and
# the mounted target is untouched.
# disks: 256M 128M 256M
# needs: module migrate
# timeout: 180
. /tests/lib.sh

load_module
must mkfs.ext4 -q -F /dev/vda
must mount -t ext4 /dev/vda /mnt/src
for i in 1 2 3; do make_file /mnt/src/f$i 128 || fail "write f$i"; done

source_io_works() { # $1: round
	make_file /mnt/src/after-$1 64 || fail "write to the source after refusal '$1' failed"
	sync
	check_md5s
}

step "target smaller than the source (256M -> 128M)"
expect_errno 'E[A-Z0-9]+' migrate attach /dev/vda /dev/vdb
grep -qiE 'small|size|short|capacity|bytes|sectors' "$ERR" ||
	fail "refusal of a smaller target does not say why (no mention of the size): $(head -c 300 "$ERR" | tr '\n' ' ')"
expect_no_filter /dev/vda
source_io_works smaller

step "the source as its own target"
expect_errno 'E[A-Z0-9]+' migrate attach /dev/vda /dev/vda
expect_no_filter /dev/vda
source_io_works self

step "a mounted target"
must mkfs.ext4 -q -F /dev/vdc
must mount -t ext4 /dev/vdc /mnt/other
echo "precious" >/mnt/other/keep || fail "write to the mounted target"
sync
expect_errno 'E[A-Z0-9]+' migrate attach /dev/vda /dev/vdc
expect_no_filter /dev/vda
source_io_works mounted-target
expect_eq "$(cat /mnt/other/keep)" precious "content of the mounted target"
must umount /mnt/other
fsck_clean /dev/vdc

step "a target that does not exist / is not a block device"
expect_errno 'E[A-Z0-9]+' migrate attach /dev/vda /dev/nonexistent
expect_errno 'E[A-Z0-9]+' migrate attach /dev/vda /tmp/cmd.out
expect_no_filter /dev/vda

step "after all refusals: the source is intact and a valid attach works"
must umount /mnt/src
fsck_clean /dev/vda
must mount -t ext4 /dev/vda /mnt/src
drop_caches
check_md5s
run_capture migrate attach /dev/vda /dev/vdc
[ "$RC" -eq 0 ] || fail "valid attach after refusals failed (exit $RC): $(head -c 300 "$ERR" | tr '\n' ' ')"
expect_mode /dev/vda clone
must migrate detach /dev/vda
expect_no_filter /dev/vda
must umount /mnt/src
unload_module
echo ok
