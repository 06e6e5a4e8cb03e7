#!/bin/sh
# crash-flush-redirect: the flush path, proved. The target is a dm-log-writes device (log on
# vdc), which records every write to it in the order it became durable, with the flush and FUA
# marks. The migration switches, the writer goes on through the redirect (every write O_DSYNC,
# acknowledged on the notes disk), then is frozen and the machine resets. Second boot: the log is
# replayed onto a blank disk (vdd) up to the last flush (and every FUA write): that disk, what
# the target was guaranteed to hold, mounts, is fsck-clean and holds every acknowledged write.
# A redirect that dropped PREFLUSH or FUA would leave the writes after the switch out of it.
# disks: 160M 160M 768M 160M
# needs: module migrate
# boots: 2
# timeout: 480
. /tests/lib.sh
. /tests/live-lib.sh

if [ "$BLKMIG_BOOT" = 1 ]; then
	crash_writer_begin /dev/vda
	n=$(dev_sectors /dev/vdb)
	must dmsetup create lwtgt --table "0 $n log-writes /dev/vdb /dev/vdc"
	[ -b /dev/mapper/lwtgt ] || dmsetup mknodes lwtgt
	[ -b /dev/mapper/lwtgt ] || fail "dmsetup made no /dev/mapper/lwtgt"
	live_start /dev/vda /dev/mapper/lwtgt --max-pause 500ms --state-dir "$CRASH_STATE"
	redirect_writes /dev/vda 3
	note acks_before_freeze "$(wc -l </notes/acks)"
	# Frozen, so that every acknowledged write has reached the log (dm-log-writes completes a
	# FUA write before it logs it) when the machine resets.
	kill -STOP "$SW_PID"
	sleep 1
	echo "  writer frozen after $(wc -l </notes/acks) acknowledgements; dm-log-writes: $(dmsetup status lwtgt)"
	hard_reset
fi

step "boot 2: replay the target's log up to its last flush onto a blank disk"
live_prepare
run_capture stampwriter replay-log /dev/vdc /dev/vdd
[ "$RC" -eq 0 ] || fail "replay-log failed: $(errtail "$ERR")"
grep -q 'the last flush is entry [0-9]' "$OUT" || fail "the log holds no flush"
not_recognisable /dev/vda
after_crash_fs /dev/vdd
