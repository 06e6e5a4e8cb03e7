#!/bin/sh
# crash-in-clone: the machine resets (no sync, no unmount) in the middle of the copy, with a
# writer whose every completed write is durable (O_DSYNC) and acknowledged on a separate disk.
# Second boot: the source mounts, is fsck-clean and holds every acknowledged write; the target
# is recognised by no tool and does not mount; `migrate status` (no filter attached) says the
# source holds the filesystem and names the migration that did not finish.
# disks: 160M 160M
# needs: module migrate
# boots: 2
# timeout: 420
. /tests/lib.sh
. /tests/live-lib.sh

if [ "$BLKMIG_BOOT" = 1 ]; then
	crash_writer_begin /dev/vda
	step "migrate start --rate-limit 8M in the background; reset in the middle of the copy"
	migrate start /dev/vda /dev/vdb --rate-limit 8M --full-copy --state-dir "$CRASH_STATE" >/tmp/mig1.log 2>&1 &
	wait_synced /dev/vda 40
	expect_mode /dev/vda clone
	echo "  $(status_field /dev/vda regions_synced) of $(status_field /dev/vda regions_total) regions in sync"
	hard_reset
fi

step "boot 2, after a reset in CLONE"
live_prepare
expect_offline_state /dev/vda /dev/vdb source_authoritative
grep -q '"started"[[:space:]]*:[[:space:]]*{' "$OUT" || fail "migrate status does not name the migration that did not finish: $(head -c 300 "$OUT")"
not_recognisable /dev/vdb
after_crash_fs /dev/vda
