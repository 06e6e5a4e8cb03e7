#!/bin/sh
# clone-target-fails: the target starts failing every write in the middle of the copy (a dm
# device over vdb whose table is swapped to the error target). The application never sees an
# error, `migrate start` stops with a message that names the target's failure and exits non-zero,
# the filter is FAILED (mirroring stopped), nothing is retired, and the source's filesystem is
# fsck-clean with every stamp.
# disks: 160M 160M
# needs: module migrate
# timeout: 300
. /tests/lib.sh
. /tests/live-lib.sh
export DM_DISABLE_UDEV=1

tsz=$(dev_sectors /dev/vdb)
must dmsetup create tgt --table "0 $tsz linear /dev/vdb 0"
[ -b /dev/mapper/tgt ] || fail "dmsetup made no /dev/mapper/tgt"
live_begin /dev/vda

step "migrate start /dev/vda /dev/mapper/tgt (copy slowed to ~8 MiB/s)"
migrate start /dev/vda /dev/mapper/tgt --rate-limit 8M --full-copy --max-pause 200ms >/tmp/mig.log 2>&1 &
mig=$!
wait_synced /dev/vda 16 120

step "the target fails every I/O from now on"
must dmsetup suspend tgt
must dmsetup load tgt --table "0 $tsz error"
must dmsetup resume tgt
wait $mig
rc=$?
sed 's/^/  migrate: /' /tmp/mig.log | tail -n 6
[ $rc -ne 0 ] || fail "migrate start exited 0 although the target failed"
grep -qi 'target' /tmp/mig.log || fail "migrate's error does not name the target: $(errtail /tmp/mig.log)"
grep -q '^switched:' /tmp/mig.log && fail "migrate switched to a failing target"
# The copier's own write to the target may fail first (migrate stops, the filter stays in CLONE)
# or a mirrored write (the filter is FAILED): either way, no switch and the source is intact.
mode=$(status_mode /dev/vda)
case "$mode" in clone | failed) echo "  filter mode after the failure: $mode" ;; *) fail "mode of /dev/vda after the target failed: '$mode'" ;; esac

live_check_intact /dev/vda
must dmsetup remove tgt
unload_module
