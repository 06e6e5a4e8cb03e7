#!/bin/sh
# clone-target-removed: the target disk is hot-removed (its virtio PCI device goes away) in the
# middle of the copy. The filter's holder callback puts the migration in FAILED: the application
# never sees an error, `migrate start` exits non-zero naming the target, nothing is retired, and
# the source's filesystem is fsck-clean with every stamp.
# disks: 160M 160M
# needs: module migrate
# timeout: 300
. /tests/lib.sh
. /tests/live-lib.sh

pci=$(readlink -f /sys/block/vdb/device/..)
[ -e "$pci/remove" ] || fail "no PCI remove attribute for vdb ($pci)"
live_begin /dev/vda

step "migrate start /dev/vda /dev/vdb (copy slowed to ~8 MiB/s)"
migrate start /dev/vda /dev/vdb --rate-limit 8M --full-copy --max-pause 200ms >/tmp/mig.log 2>&1 &
mig=$!
wait_synced /dev/vda 16 120

step "remove the target's PCI device ($pci)"
echo 1 >"$pci/remove" || fail "PCI remove of the target failed"
wait_until 20 "/dev/vdb to disappear" test ! -e /sys/block/vdb
wait $mig
rc=$?
sed 's/^/  migrate: /' /tmp/mig.log | tail -n 6
[ $rc -ne 0 ] || fail "migrate start exited 0 although the target was removed"
grep -qi 'target' /tmp/mig.log || fail "migrate's error does not name the target: $(errtail /tmp/mig.log)"
expect_mode /dev/vda failed

live_check_intact /dev/vda
unload_module
