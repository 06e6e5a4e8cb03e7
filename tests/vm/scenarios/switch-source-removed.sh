#!/bin/sh
# switch-source-removed: the source disk is hot-removed while the copier is frozen inside its
# switch window (writes held, CLONE). The filter does not serve the source yet, so the removal
# goes as without blkmig, and must not hang: the filesystem's final writeback waits at most the
# hold timeout, the filter is detached with the disk, the resumed copier fails naming the
# source, nothing reaches the target's head (no tool recognises it), and the module unloads.
# disks: 160M 160M
# needs: module migrate
# timeout: 300
. /tests/lib.sh
. /tests/live-lib.sh

live_begin /dev/vda
refs0=$(module_refs)
pci=$(pci_of /dev/vda)

step "migrate start --hold-timeout 2s, frozen inside its switch window"
# --max-pause 1s: the copier holds with regions still to copy, so that its window (short since
# the head is saved and both devices flushed before the hold) is long enough to be caught.
migrate start /dev/vda /dev/vdb --hold-timeout 2s --max-pause 1s >/tmp/mig1.log 2>&1 &
mig=$!
freeze_in_switch_window $mig /dev/vda
echo "BLKMIG-SOURCE-REMOVED-IN-SWITCH hit=$HIT"
[ "$HIT" = yes ] || fail "the copier was never seen frozen inside a switch window"

step "remove the source while writes are held (bounded: 30 s)"
t0=$(cs_now)
timeout 30 sh -c "echo 1 >$pci/remove" || fail "removing the source did not finish in 30 s with writes held"
echo "  removed in $(($(cs_now) - t0))0 ms"
dmesg | grep -q 'serves it until its last close' && fail "the filter kept a source removed in its switch window"
wait_until 15 "the filter to be detached (refcnt $(module_refs))" _refs_are "$refs0"
kill -CONT $mig
expect_migrate_failed $mig /tmp/mig1.log /dev/vda "its source was removed in the switch window"
if blkid -p /dev/vdb 2>/dev/null | grep -q TYPE=; then
	fail "the target is recognisable after the source was removed mid-switch: $(blkid -p /dev/vdb)"
fi
kill "$SW_PID" 2>/dev/null
umount /mnt/src 2>/dev/null || umount -l /mnt/src
unload_module
echo "ok: a source removed in the switch window fails the migration, no hang"
