#!/bin/sh
# retire-unplug-two-partitions: two partitions of vda, each with a busy mounted ext4, migrated
# to vdb and vdc by two migrations that both switch; then vda is hot-removed. Two filters keep
# the two partitions of one removed disk: both filesystems keep working. Unmounting the first
# detaches its filter only; the second still writes back 40 MiB of buffered writes (the disk's
# bdi must live until the last kept partition goes), then its unmount detaches the last filter.
# disks: 160M 96M 96M
# needs: module migrate
# timeout: 420
. /tests/lib.sh
. /tests/live-lib.sh

live_prepare
write_mbr /dev/vda 2048 153600 155648 153600
[ -b /dev/vda1 ] && [ -b /dev/vda2 ] || fail "/dev/vda1 and /dev/vda2 did not appear"
refs0=$(module_refs)
mkdir -p /mnt/p2
must mkfs.ext4 -q -F /dev/vda2
must mount -t ext4 /dev/vda2 /mnt/p2
make_file /mnt/p2/before.dat 4096 || fail "writing /mnt/p2/before.dat failed"
live_begin /dev/vda1
live_start /dev/vda1 /dev/vdb --max-pause 200ms
live_start /dev/vda2 /dev/vdc --max-pause 200ms
expect_mode /dev/vda1 redirect
expect_mode /dev/vda2 redirect

pci=$(pci_of /dev/vda)
step "remove vda with both partitions mounted"
dmesg -c >/dev/null
echo 1 >"$pci/remove" || fail "PCI remove of vda failed"
wait_until 10 "vda to disappear" _gone /dev/vda
expect_eq "$(dmesg | grep -c 'removed; filter blkmig serves it until its last close')" 2 "partitions kept by their filters"
sleep 1
sw_alive
make_file /mnt/p2/after.dat 4096 || fail "writing to vda2 failed after the removal"

step "umount vda1: its filter goes, vda2's stays"
sw_stop
must umount /mnt/src
wait_until 10 "vda1's filter to be detached" _refs_are $((refs0 + 1))

step "vda2 still writes back 40 MiB over an 8 MiB dirty limit (bounded: 90 s)"
echo 4194304 >/proc/sys/vm/dirty_background_bytes
echo 8388608 >/proc/sys/vm/dirty_bytes
timeout 90 dd if=/dev/urandom of=/mnt/p2/buffered.dat bs=1M count=40 2>/dev/null ||
	fail "40 MiB of buffered writes to vda2 did not finish in 90 s after vda1's filter went"
md5sum /mnt/p2/buffered.dat >>/tmp/md5s
timeout 60 sync || fail "sync did not finish in 60 s"
must umount /mnt/p2
wait_until 10 "vda2's filter to be detached" _refs_are "$refs0"

live_check_target /dev/vdb
step "vdc holds vda2's filesystem with every file"
fsck_clean /dev/vdc
must mount -t ext4 /dev/vdc /mnt/p2
check_md5s
must umount /mnt/p2
unload_module
echo "ok: two kept partitions of one removed disk, released one after the other"
