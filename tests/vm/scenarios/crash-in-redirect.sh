#!/bin/sh
# crash-in-redirect: after the switch, the writer goes on through the redirect (every completed
# write durable and acknowledged on a separate disk), then the machine resets (no sync, no
# unmount). Second boot: the target mounts, is fsck-clean and holds every acknowledged write,
# those made after the switch included; the source is retired (blkid finds nothing, it does not
# mount); `migrate status` (no filter attached) says the switch completed and where the saved
# head is. Before it all, a state directory on the source itself is refused.
# disks: 160M 160M
# needs: module migrate
# boots: 2
# timeout: 420
. /tests/lib.sh
. /tests/live-lib.sh

if [ "$BLKMIG_BOOT" = 1 ]; then
	crash_writer_begin /dev/vda
	step "a state directory on the source is refused, and nothing is attached"
	expect_fail_msg "holds the state directory" migrate start /dev/vda /dev/vdb --state-dir /mnt/src/blkmig
	expect_no_filter /dev/vda
	live_start /dev/vda /dev/vdb --max-pause 500ms --state-dir "$CRASH_STATE"
	redirect_writes /dev/vda 3
	hard_reset
fi

step "boot 2, after a reset in REDIRECT"
live_prepare
offline_state /dev/vda
[ "$OFFLINE_STATE" = retired ] || fail "migrate status /dev/vda (no target named) does not say retired: $(head -c 300 "$OUT")"
grep -q "source-head.bin" "$OUT" || fail "migrate status does not say where the saved head is: $(head -c 300 "$OUT")"
expect_offline_state /dev/vda /dev/vdb target_authoritative
not_recognisable /dev/vda
after_crash_fs /dev/vdb
