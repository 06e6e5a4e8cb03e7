#!/bin/sh
# boot-smoke: the harness itself (no module, no migrate): both disks are there, ext4 works
# (mkfs, mount, write, fsck, remount, verify), patterns land where they are written, and the
# unprivileged user exists.
# disks: 256M 128M
# needs:
# timeout: 120
. /tests/lib.sh

step "disks"
expect_eq "$(dev_sectors /dev/vda)" 524288 "size of vda (sectors)"
expect_eq "$(dev_sectors /dev/vdb)" 262144 "size of vdb (sectors)"

step "raw patterns at sector offsets (O_DIRECT)"
write_pattern /dev/vdb 0 ZERO 2048
write_pattern /dev/vdb 4099 ODD 1000
expect_pattern /dev/vdb 0 ZERO 2048
expect_pattern /dev/vdb 4099 ODD 1000
[ "$(read_md5 /dev/vdb 4098 1)" = "$(dd if=/dev/zero bs=512 count=1 2>/dev/null | md5sum | cut -d' ' -f1)" ] ||
	fail "sector before the ODD pattern is not zero"

step "ext4 on vda"
must mkfs.ext4 -q -F /dev/vda
must mount -t ext4 /dev/vda /mnt/src
mkdir -p /mnt/src/d
for i in 1 2 3 4 5 6 7 8; do make_file /mnt/src/d/f$i $((i * 64)) || fail "write f$i"; done
must sync
check_md5s
must umount /mnt/src
fsck_clean /dev/vda
must mount -t ext4 /dev/vda /mnt/src
drop_caches
check_md5s
must umount /mnt/src

step "unprivileged user"
expect_eq "$(su -s /bin/sh user -c 'id -u')" 1000 "uid of user"
echo "ok"
