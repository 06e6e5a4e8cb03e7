#!/bin/sh
# crash-in-switch: the machine resets inside the switch, after the retire marker reached the
# source and before the target got its head: the target is a dm-delay device that holds each
# write and flush for 5 s, and the reset comes while the target's head write waits there (seen
# in dm-delay's counts: the flush before the hold, the last region's write, the switch's flush
# of the target, then a write alone).
# Second boot: exactly one state: neither disk is recognisable or mounts (never both);
# `migrate status --target` says the switch was interrupted; `migrate recover` writes the saved
# head to the target (or, with RECOVER=rollback, back to the source), after which that disk
# mounts, is fsck-clean and holds every acknowledged write, and the other is not recognisable.
# disks: 160M 160M
# needs: module migrate
# boots: 2
# timeout: 480
. /tests/lib.sh
. /tests/live-lib.sh

RECOVER=${RECOVER:-finish}

# delay_counts: "READS WRITES FLUSHES" dm-delay holds now
delay_counts() {
	dmsetup status slowtgt | awk '{ print $4, $5, $6 }'
}
_flush_queued() {
	set -- $(delay_counts)
	[ "${3:-0}" -ge 1 ]
}
_no_flush_queued() {
	set -- $(delay_counts)
	[ "${3:-1}" -eq 0 ]
}
_head_write_queued() {
	set -- $(delay_counts)
	[ "${3:-1}" -eq 0 ] && [ "${2:-0}" -ge 1 ]
}

if [ "$BLKMIG_BOOT" = 1 ]; then
	crash_writer_begin /dev/vda
	n=$(dev_sectors /dev/vdb)
	must dmsetup create slowtgt --table "0 $n linear /dev/vdb 0"
	[ -b /dev/mapper/slowtgt ] || dmsetup mknodes slowtgt
	[ -b /dev/mapper/slowtgt ] || fail "dmsetup made no /dev/mapper/slowtgt: $(ls -l /dev/mapper 2>&1 | tr "\n" " "); $(dmsetup ls 2>&1); $(dmsetup table 2>&1)"
	step "copy everything but the boundary regions (--no-switch)"
	must migrate start /dev/vda /dev/mapper/slowtgt --no-switch --state-dir "$CRASH_STATE"
	expect_mode /dev/vda clone
	step "writer stopped, filesystem idle; every write and flush to the target now waits 5 s"
	sw_stop
	sync
	must dmsetup suspend slowtgt
	must dmsetup load slowtgt --table "0 $n delay /dev/vdb 0 0 /dev/vdb 0 5000"
	must dmsetup resume slowtgt
	step "migrate start: the switch"
	migrate -v start /dev/vda /dev/mapper/slowtgt --max-pause 60s --hold-timeout-ms 40000 \
		--state-dir "$CRASH_STATE" >/tmp/mig.log 2>&1 &
	# migrate flushes both devices just before it holds writes, then copies the last region
	# (a write) in the window, then the switch flushes the target: the second flush.
	wait_until 60 "the flush before the hold" _flush_queued
	wait_until 30 "that flush to end" _no_flush_queued
	wait_until 60 "the switch's flush of the target" _flush_queued
	echo "  dm-delay holds (reads writes flushes): $(delay_counts)"
	wait_until 30 "the target's head write after the flush" _head_write_queued
	echo "  dm-delay holds (reads writes flushes): $(delay_counts): the head write waits"
	# The marker was written (FUA) and the source flushed before the head write was issued.
	hard_reset
fi

step "boot 2, after a reset between the retire marker and the target's head"
live_prepare
expect_offline_state /dev/vda /dev/vdb interrupted_switch
not_recognisable /dev/vda
not_recognisable /dev/vdb
if [ "$RECOVER" = rollback ]; then
	step "migrate recover --rollback: the source gets its head back"
	must migrate recover /dev/vda /dev/vdb --rollback --state-dir "$CRASH_STATE"
	expect_offline_state /dev/vda /dev/vdb source_authoritative
	not_recognisable /dev/vdb
	after_crash_fs /dev/vda
else
	step "migrate recover: the target gets its head"
	must migrate recover /dev/vda /dev/vdb --state-dir "$CRASH_STATE"
	expect_offline_state /dev/vda /dev/vdb target_authoritative
	not_recognisable /dev/vda
	after_crash_fs /dev/vdb
	step "a second recover changes nothing and says why"
	expect_fail_msg "switch completed" migrate recover /dev/vda /dev/vdb --state-dir "$CRASH_STATE"
fi
