#!/bin/sh
# retire-unplug-same-disk: ext4 on vda1 migrated to vda2, a partition of the same disk, and
# switched; then vda is hot-removed. The target goes with the disk, so the filter must not keep
# vda1 (it could serve nothing): the removal goes as without blkmig. The filesystem is shut down
# (the writer's writes fail), nothing hangs, the filter is detached, and the module unloads.
# disks: 160M
# needs: module migrate
# timeout: 300
. /tests/lib.sh
. /tests/live-lib.sh

live_prepare
write_mbr /dev/vda 2048 153600 155648 153600
[ -b /dev/vda1 ] && [ -b /dev/vda2 ] || fail "/dev/vda1 and /dev/vda2 did not appear"
refs0=$(module_refs)
live_begin /dev/vda1
live_start /dev/vda1 /dev/vda2 --max-pause 200ms
expect_mode /dev/vda1 redirect
pci=$(pci_of /dev/vda)

step "remove vda: source and target go together (bounded: 30 s)"
dmesg -c >/dev/null
timeout 30 sh -c "echo 1 >$pci/remove" || fail "removing vda did not finish in 30 s"
wait_until 10 "vda to disappear" _gone /dev/vda
dmesg | grep -q 'serves it until its last close' && fail "the filter kept vda1 although its target went with the disk"
wait_until 15 "the filter to be detached (refcnt $(module_refs))" _refs_are "$refs0"
expect_exit_within "$SW_PID" 30 "the writer, whose disk was removed,"
umount /mnt/src 2>/dev/null || umount -l /mnt/src
unload_module
echo "ok: a target on the removed disk is not served; the removal goes as usual"
