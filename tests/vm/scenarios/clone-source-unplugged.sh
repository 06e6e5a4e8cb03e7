#!/bin/sh
# clone-source-unplugged: the source disk (vda) is hot-removed in CLONE, halfway through the
# copy (rate-limited). The filter is not serving the device yet, so the removal goes as without
# blkmig: the filter is detached, `migrate start` fails with a message naming the source, the
# filesystem meets its usual fate (shut down: the writer's writes fail), the target is not
# recognisable as a filesystem (its head is blank), no hang and no kernel warning, and the
# module can be unloaded.
# disks: 160M 160M
# needs: module migrate
# timeout: 300
. /tests/lib.sh
. /tests/live-lib.sh

live_begin /dev/vda
refs0=$(module_refs)
pci=$(pci_of /dev/vda)
step "migrate start --rate-limit 8M, removed halfway"
migrate start /dev/vda /dev/vdb --rate-limit 8M --full-copy --max-pause 200ms >/tmp/mig1.log 2>&1 &
mig=$!
wait_synced /dev/vda 60
echo 1 >"$pci/remove" || fail "PCI remove of the source failed"
expect_migrate_failed $mig /tmp/mig1.log /dev/vda "its source was removed in CLONE"
dmesg | grep -q 'serves it until its last close' && fail "the filter kept a source removed in CLONE"
wait_until 10 "the filter to be detached (refcnt $(module_refs))" _refs_are "$refs0"

step "the writer fails (the filesystem is shut down), the target is not recognisable"
expect_exit_within "$SW_PID" 30 "the writer, whose disk was removed,"
if blkid -p /dev/vdb 2>/dev/null | grep -q TYPE=; then
	fail "the target is recognisable after a failed migration: $(blkid -p /dev/vdb)"
fi
umount /mnt/src 2>/dev/null || umount -l /mnt/src
unload_module
echo "ok: a source removed in CLONE fails the migration cleanly"
