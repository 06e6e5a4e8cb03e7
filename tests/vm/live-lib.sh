# Helpers for the live-migration VM scenarios (tests/vm/scenarios/live-*.sh and the demo).
# Sourced after lib.sh:  . /tests/lib.sh; . /tests/live-lib.sh
#
# The usual flow (live_migrate_flow does all of it):
#   live_begin SRC                  module, ext4 on SRC mounted on /mnt/src, stampwriter running
#   live_start SRC TGT [ARGS...]    `migrate start SRC TGT ARGS...` must switch; its pause is kept
#   live_finish SRC TGT             writer keeps going on the redirect, stop, umount, detach, then
#                                   the target is checked (fsck, mount, stampwriter verify) and the
#                                   source is checked (retire marker, saved head)
#
# The writer: `stampwriter write` on /mnt/src/stamp.dat (SW_BLOCKS 4 KiB blocks, O_DIRECT), its
# log and output kept on the initramfs in /tmp. SW_ARGS adds options (e.g. "--hot 100").

SW_STOP=/tmp/sw.stop
SW_LOG=/tmp/sw.log
SW_OUT=/tmp/sw.out
SW_FILE=/mnt/src/stamp.dat
SW_BLOCKS=${SW_BLOCKS:-4096}
SW_ARGS=${SW_ARGS:---gap-us 500}
MIG_LOG=/tmp/mig.log
MIG_PAUSE_MS=
SW_MAX_MS=

# uptime in centiseconds (for timings inside the guest)
cs_now() {
	sed 's/^\([0-9]*\)\.\([0-9][0-9]\).*/\1\2/' /proc/uptime
}

live_prepare() {
	[ -d /sys/module/blkmig ] || load_module
	command -v stampwriter >/dev/null || fail "stampwriter is not in the initramfs"
}

# devnum DEV: "MAJ-MIN" of a block device (the state directory's name)
devnum() {
	tr ':' '-' <"/sys/class/block/$(basename "$1")/dev"
}

# errtail FILE: the end of a file, on one line (for fail reasons)
errtail() {
	tail -c 300 "$1" 2>/dev/null | tr '\n' ' '
}

# --- the writer -------------------------------------------------------------------------------

# sw_start FILE: start stampwriter on FILE (in the background) and wait until it has stamped
# every block once (from then on it rewrites random blocks until $SW_STOP exists)
sw_start() {
	SW_FILE=$1
	rm -f "$SW_STOP" "$SW_LOG" "$SW_OUT"
	# shellcheck disable=SC2086 # SW_ARGS is a list of options
	stampwriter write "$SW_FILE" "$SW_LOG" --blocks "$SW_BLOCKS" --stop "$SW_STOP" $SW_ARGS >"$SW_OUT" 2>&1 &
	SW_PID=$!
	wait_until 180 "stampwriter to stamp its $SW_BLOCKS blocks" _sw_ready
	echo "  stampwriter (pid $SW_PID) writing $SW_FILE ($SW_BLOCKS blocks, $SW_ARGS)"
}
_sw_ready() {
	kill -0 "$SW_PID" 2>/dev/null || {
		cat "$SW_OUT"
		fail "stampwriter exited early: $(errtail "$SW_OUT")"
	}
	grep -q 'blocks stamped' "$SW_OUT"
}

# sw_alive: the writer is still running (it stops at the first failed write)
sw_alive() {
	kill -0 "$SW_PID" 2>/dev/null || {
		cat "$SW_OUT"
		fail "stampwriter died: $(errtail "$SW_OUT")"
	}
}

# sw_stop: stop the writer; it must exit 0 (no failed write). Sets SW_MAX_MS.
sw_stop() {
	touch "$SW_STOP"
	wait "$SW_PID"
	_rc=$?
	sed 's/^/  /' "$SW_OUT"
	[ "$_rc" -eq 0 ] || fail "stampwriter failed (exit $_rc): $(errtail "$SW_OUT")"
	SW_MAX_MS=$(sed -n 's/^STAMPWRITER-MAX-LATENCY-MS \([0-9.]*\).*/\1/p' "$SW_OUT" | tail -n1)
	[ -n "$SW_MAX_MS" ] || fail "stampwriter printed no STAMPWRITER-MAX-LATENCY-MS line"
	[ -s "$SW_LOG" ] || fail "stampwriter saved no log"
}

# sw_verify FILE: every block of FILE holds its last stamp
sw_verify() {
	stampwriter verify "$1" "$SW_LOG" >/tmp/swv.out 2>&1
	_rc=$?
	sed 's/^/  /' /tmp/swv.out
	[ "$_rc" -eq 0 ] || fail "stampwriter verify $1 failed: $(head -c 300 /tmp/swv.out | tr '\n' ' ')"
}

# hot_seq FILE BLOCK: the sequence number stamped in BLOCK of FILE, read with O_DIRECT (what is
# on the disk, not in the cache). With --hot BLOCK it grows with every other write: the writer's
# progress as seen on the device.
hot_seq() {
	dd if="$1" bs=4096 skip="$2" count=1 iflag=direct 2>/dev/null | od -An -tu8 -j16 -N8 | tr -d ' '
}

# --- migrate ----------------------------------------------------------------------------------

# live_begin SRC: module loaded, ext4 on SRC mounted on /mnt/src, stampwriter running on it
live_begin() {
	live_prepare
	step "ext4 on $1, mounted, stampwriter running"
	must mkfs.ext4 -q -F "$1"
	must mount -t ext4 "$1" /mnt/src
	sw_start /mnt/src/stamp.dat
}

# max_pause_ms [MIGRATE ARGS...]: the --max-pause those arguments give, in ms (100 by default)
max_pause_ms() {
	_mp=100ms
	while [ $# -gt 0 ]; do
		case "$1" in
		--max-pause) _mp=$2; shift ;;
		--max-pause=*) _mp=${1#--max-pause=} ;;
		esac
		shift
	done
	case "$_mp" in
	*ms) echo "${_mp%ms}" ;;
	*s) echo $((${_mp%s} * 1000)) ;;
	*) fail "max_pause_ms: cannot read --max-pause $_mp" ;;
	esac
}

# live_debug_pause: on the debug kernel (BLKMIG_KERNEL=debug: lockdep, KASAN, debug objects),
# the budget a live scenario gets where it sets none: the switch's own work (drain, flushes,
# the retire marker, the target's head) takes 2-3 times as long there as on the normal kernel,
# which keeps migrate's default of 100 ms. Prints nothing on the normal kernel.
live_debug_pause() {
	[ "${BLKMIG_KERNEL:-normal}" != debug ] || echo 300ms
}

# live_start SRC TGT [ARGS...]: `migrate start` in the foreground (its progress and summary go
# to the console as they come); it must exit 0 and switch, and no write may have waited longer
# than --max-pause (live_check_pause; on the debug kernel without --max-pause, the
# live_debug_pause budget). Sets MIG_PAUSE_MS, MIG_SECS.
live_start() {
	case " $* " in
	*" --max-pause"*) ;;
	*) [ -z "$(live_debug_pause)" ] || set -- "$@" --max-pause "$(live_debug_pause)" ;;
	esac
	step "migrate start $*"
	_t0=$(cs_now)
	{
		migrate start "$@"
		echo $? >/tmp/mig.rc
	} 2>&1 | tee "$MIG_LOG"
	_rc=$(cat /tmp/mig.rc)
	MIG_SECS=$(echo "$_t0 $(cs_now)" | awk '{ printf "%.1f", ($2 - $1) / 100 }')
	[ "$_rc" -eq 0 ] || fail "migrate start $* failed (exit $_rc): $(errtail "$MIG_LOG")"
	grep -q '^switched:' "$MIG_LOG" || fail "migrate start $* exited 0 but did not switch: $(errtail "$MIG_LOG")"
	live_check_pause "$MIG_LOG" "$@"
	echo "  migrate start took ${MIG_SECS}s, pause ${MIG_PAUSE_MS} ms"
	sw_alive
}

# live_check_pause LOG [MIGRATE ARGS...]: sets MIG_PAUSE_MS from the summary in LOG (its text
# or its --json), the module's own figure: the longest any write waited in a hold, failed
# attempts included. Fails if that is over the arguments' --max-pause (LIVE_PAUSE_UNBOUNDED=1:
# a scenario that killed a copier in its window, whose hold only the module's timer ended).
live_check_pause() {
	_log=$1
	shift
	MIG_PAUSE_MS=$(sed -n -e 's/.*writes paused \([0-9.]*\) ms.*/\1/p' \
		-e 's/.*"pause_ms":\([0-9.]*\).*/\1/p' "$_log" | tail -n1)
	[ -n "$MIG_PAUSE_MS" ] || fail "migrate's summary names no pause: $(errtail "$_log")"
	_budget=$(max_pause_ms "$@")
	[ "${LIVE_PAUSE_UNBOUNDED:-0}" = 1 ] ||
		awk -v p="$MIG_PAUSE_MS" -v b="$_budget" 'BEGIN { exit !(p <= b) }' ||
		fail "writes were held ${MIG_PAUSE_MS} ms, over --max-pause ${_budget} ms ($(hold_story)): $(errtail "$_log")"
}

# hold_story: what the module said of the last holds (a timer that released writes past its
# deadline, a switch whose last writes ended past it, a switch that released them late when it
# gave up), for a pause over its budget.
hold_story() {
	dmesg | sed -n -e 's/.*blkmig: \(write hold timed out[^:]*\):.*/\1/p' \
		-e 's/.*blkmig: \(switch cancelled.*\)/\1/p' \
		-e 's/.*blkmig: switch ended: \(writes released .*\)/\1/p' \
		-e 's/.*blkmig: switched: every bio now goes to the target\(.*\)/switched\1/p' |
		tail -n 4 | paste -sd ';' -
}

# live_finish SRC TGT: after the switch: redirect, the writer keeps writing for 2 s through the
# redirect, then stop, umount, detach; the target holds the filesystem with every last stamp;
# the source is retired and its head saved.
live_finish() {
	_src=$1
	_tgt=$2
	step "after the switch: $_src redirects to $_tgt, the writer keeps writing"
	expect_mode "$_src" redirect
	LIVE_REGION_BYTES=$(status_field "$_src" region_bytes)
	_r0=$(status_field "$_src" bios_redirected)
	sleep 2
	sw_alive
	_r1=$(status_field "$_src" bios_redirected)
	echo "  bios_redirected: ${_r0:-?} -> ${_r1:-?} in 2 s"
	[ "${_r1:-0}" -gt "${_r0:-0}" ] || fail "no bio was redirected in 2 s of writing after the switch (${_r0:-?} -> ${_r1:-?})"
	expect_mode "$_src" redirect

	step "stop the writer; detach is refused while the filesystem is mounted"
	sw_stop
	# In REDIRECT the source is served by the target: detaching under a
	# mounted filesystem would hand it back to the retired source.
	expect_errno EBUSY migrate detach "$_src"
	expect_mode "$_src" redirect
	step "umount, detach"
	must umount /mnt/src
	run_capture migrate detach "$_src"
	[ "$RC" -eq 0 ] || fail "migrate detach $_src failed (exit $RC): $(errtail "$ERR")"
	expect_no_filter "$_src"

	live_check_target "$_tgt"
	live_check_retired "$_src" "$_tgt"
	echo "BLKMIG-PAUSE writer_ms=$SW_MAX_MS migrate_ms=$MIG_PAUSE_MS"
}

# live_check_target TGT: fsck clean, mounts, every stamp is the last one written
live_check_target() {
	step "the target $1: fsck, mount, stampwriter verify"
	drop_caches
	fsck_clean "$1"
	must mount -t ext4 "$1" /mnt/tgt
	sw_verify /mnt/tgt/stamp.dat
	must umount /mnt/tgt
}

# live_check_retired SRC TGT: SRC starts with the retire marker, is no longer an ext4
# filesystem, and its head (its first 128 KiB, whatever the region size) is saved in
# /var/lib/blkmig/MAJ-MIN/source-head.bin, with the ext4 superblock of the filesystem now on TGT
live_check_retired() {
	step "the source $1: retire marker, saved head"
	dd if="$1" bs=4096 count=1 iflag=direct 2>/dev/null | head -c 16 | grep -qa 'BLKMIG-RETIRED' ||
		fail "$1 does not start with the retire marker: $(dd if="$1" bs=4096 count=1 iflag=direct 2>/dev/null | head -c 32 | od -An -c | tr -s ' \n' ' ')"
	if blkid -p "$1" 2>/dev/null | grep -q 'TYPE="ext4"'; then
		fail "the retired $1 is still recognisable as ext4: $(blkid -p "$1")"
	fi
	_head=/var/lib/blkmig/$(devnum "$1")/source-head.bin
	[ -f "$_head" ] || fail "no saved head $_head ($(ls -R /var/lib/blkmig 2>&1 | tr '\n' ' '))"
	_size=$(stat -c %s "$_head")
	echo "  $_head: $_size bytes (region: ${LIVE_REGION_BYTES:-?} bytes)"
	[ -n "${LIVE_REGION_BYTES:-}" ] || fail "the region size is unknown (status had no region_bytes)"
	expect_eq "$_size" 131072 "size of $_head (the head: its first 128 KiB)"
	_magic=$(dd if="$_head" bs=1 skip=1080 count=2 2>/dev/null | od -An -tx1 | tr -d ' \n')
	expect_eq "$_magic" 53ef "ext4 magic at offset 1080 of $_head"
	_huuid=$(dd if="$_head" bs=1 skip=1128 count=16 2>/dev/null | od -An -tx1 | tr -d ' \n')
	_tuuid=$(dumpe2fs -h "$2" 2>/dev/null | sed -n 's/^Filesystem UUID:[[:space:]]*//p' | tr -d '-')
	expect_eq "$_huuid" "$_tuuid" "filesystem UUID in $_head vs. on $2"
	echo "  saved head: ext4 superblock of UUID $_tuuid"
}

# live_migrate_flow SRC TGT [MIGRATE ARGS...]: the whole flow on fresh disks
live_migrate_flow() {
	_s=$1
	_t=$2
	live_begin "$_s"
	live_start "$@"
	live_finish "$_s" "$_t"
}

# wait_synced DEV N: wait until at least N regions are in sync (migrate copies in the background)
wait_synced() {
	wait_until "${3:-120}" "$2 regions of $1 in sync (at $(status_field "$1" regions_synced))" _synced_at "$1" "$2"
}
_synced_at() {
	_n=$(status_field "$1" regions_synced)
	[ "${_n:-0}" -ge "$2" ]
}

# clone_partition_in_sync: vda1 (16 MiB at sector 2048, raw, pattern A written with O_DIRECT)
# migrated to vdb with --no-switch: CLONE, every region but the two boundary ones in sync
clone_partition_in_sync() {
	live_prepare
	write_mbr /dev/vda 2048 32768
	[ -b /dev/vda1 ] || fail "/dev/vda1 did not appear"
	direct_io /dev/vda1 0 A 32768 65536
	step "migrate start /dev/vda1 /dev/vdb --no-switch"
	must migrate start /dev/vda1 /dev/vdb --no-switch
	expect_mode /dev/vda1 clone
}

# live_check_intact SRC: after a migration that failed: the writer keeps writing to SRC for 2 s
# and stops cleanly; detach; umount; SRC carries no retire marker, is fsck-clean, and every
# block of the writer's file holds its last stamp
live_check_intact() {
	step "the application keeps writing to the source, untouched by the failure"
	sleep 2
	sw_alive
	sw_stop
	must migrate detach "$1"
	expect_no_filter "$1"
	must umount /mnt/src
	dd if="$1" bs=4096 count=1 iflag=direct 2>/dev/null | head -c 16 | grep -qa 'BLKMIG-RETIRED' &&
		fail "the source carries the retire marker after a failed migration"
	recheck_from_disk "$1" "sw_verify $SW_FILE"
}

# freeze_in_switch_window PID SRC: run the copier PID (a `migrate start` on SRC) in ~20 ms
# slices (SIGCONT, a builtin busy loop, SIGSTOP, `migrate status --json`) until the status of
# the frozen copier says it holds writes in clone mode: it is then inside its switch window (after
# HOLD_WRITES, before SWITCH completed), and is left stopped. Sets HIT=yes (found) or no (it
# switched, failed or exited first), and SLICES. The slices stretch only the copier's own time,
# not the kernel's deadline.
freeze_in_switch_window() {
	HIT=no
	SLICES=0
	_t_end=$(($(cs_now) + 30000))
	while [ "$(cs_now)" -lt $_t_end ]; do
		_i=0
		while [ $_i -lt 30 ]; do _i=$((_i + 1)); done
		kill -STOP "$1" 2>/dev/null || break
		SLICES=$((SLICES + 1))
		_st=$(migrate status "$2" --json 2>/dev/null)
		case "$_st" in
		*'"holding":true'*'"mode":"clone"'* | *'"mode":"clone"'*'"holding":true'*)
			HIT=yes
			return 0
			;;
		*'"mode":"clone"'* | *'"mode":"detached"'* | '') ;; # cloning, or not attached yet
		*) break ;;                 # switched or failed: too late
		esac
		kill -CONT "$1" 2>/dev/null || break
	done
	kill -CONT "$1" 2>/dev/null
	return 0
}

# --- crash scenarios (two boots) ---------------------------------------------------------------
# The writer runs with --ack /notes/acks: every write is durable when it completes (O_DSYNC) and
# is then acknowledged on the notes disk. After the reset, `stampwriter verify-acked` checks that
# no acknowledged write is missing. The state directory lives on the notes disk too (it must
# never be on the source: after the switch the source is retired).

CRASH_STATE=/notes/state

# crash_writer_begin SRC: ext4 on SRC, the acknowledging writer running on it
crash_writer_begin() {
	SW_ARGS="--gap-us 2000 --ack /notes/acks"
	live_begin "$1"
}

# redirect_writes SRC SECONDS: after the switch, the writer goes on through the redirect for
# SECONDS, and bios are seen redirected
redirect_writes() {
	expect_mode "$1" redirect
	_r0=$(status_field "$1" bios_redirected)
	sleep "$2"
	sw_alive
	_r1=$(status_field "$1" bios_redirected)
	echo "  bios_redirected: $_r0 -> $_r1 in $2 s after the switch"
	[ "${_r1:-0}" -gt "${_r0:-0}" ] || fail "nothing was redirected after the switch"
}

# after_crash_fs DEV: the filesystem on DEV mounts (its journal replays), is fsck-clean once
# unmounted, and every acknowledged stamp is on it
after_crash_fs() {
	step "$1: mount (journal replay), fsck, every acknowledged write"
	drop_caches
	must mount -t ext4 "$1" /mnt/src
	must umount /mnt/src
	fsck_clean "$1"
	must mount -t ext4 "$1" /mnt/src
	stampwriter verify-acked /mnt/src/stamp.dat /notes/acks >/tmp/swa.out 2>&1
	_rc=$?
	sed 's/^/  /' /tmp/swa.out
	[ "$_rc" -eq 0 ] || fail "acknowledged writes lost on $1: $(head -c 300 /tmp/swa.out | tr '\n' ' ')"
	must umount /mnt/src
}

# not_recognisable DEV: no tool finds a filesystem on DEV and it does not mount
not_recognisable() {
	step "$1 is not recognisable: blkid finds nothing, mount fails"
	drop_caches
	_b=$(blkid -p "$1" 2>&1)
	case "$_b" in *TYPE=*) fail "blkid recognises $1: $_b" ;; esac
	mount -t ext4 -o ro "$1" /mnt/tgt 2>/dev/null && {
		umount /mnt/tgt
		fail "$1 mounts as ext4"
	}
	echo "  blkid: ${_b:-nothing}; mount fails"
}

# offline_state SRC [TGT]: sets OFFLINE_STATE to the "state" `migrate status SRC --json`
# reports with no filter attached (reading the disks and the state directory); its JSON is in
# $OUT. Fails if the command fails.
offline_state() {
	if [ -n "${2:-}" ]; then
		run_capture migrate status "$1" --target "$2" --state-dir "$CRASH_STATE" --json
	else
		run_capture migrate status "$1" --state-dir "$CRASH_STATE" --json
	fi
	[ "$RC" -eq 0 ] || fail "migrate status $1 (no filter attached) failed (exit $RC): $(head -c 300 "$ERR" | tr '\n' ' ')"
	OFFLINE_STATE=$(sed -n 's/.*"state"[[:space:]]*:[[:space:]]*"\([a-z_]*\)".*/\1/p' "$OUT" | head -n1)
}

# expect_offline_state SRC TGT STATE: offline_state says STATE; the text output is printed
expect_offline_state() {
	offline_state "$1" "$2"
	_st=$OFFLINE_STATE
	[ -n "$_st" ] || fail "migrate status $1 --target $2 printed no state: $(head -c 300 "$OUT" | tr '\n' ' ')"
	cp "$OUT" /tmp/offline.json
	migrate status "$1" --target "$2" --state-dir "$CRASH_STATE" | sed 's/^/  /'
	cp /tmp/offline.json "$OUT"
	expect_eq "$_st" "$3" "state of $1 and $2 after the reset"
}

# --- unplugging the retired source ------------------------------------------------------------

# pci_of DEV: the PCI device directory of virtio disk DEV (for .../remove)
pci_of() {
	_p=$(readlink -f "/sys/block/$(basename "$1")/device/..")
	[ -e "$_p/remove" ] || fail "no PCI remove attribute for $1 ($_p)"
	echo "$_p"
}

# module_refs: the blkmig module's reference count (one per attached filter)
module_refs() {
	cat /sys/module/blkmig/refcnt 2>/dev/null || echo gone
}

# unplug_served SRC TGT MNT: after the switch, the PCI device of SRC is removed while the
# filesystem on MNT stays mounted and the writer keeps writing: the device node goes, the
# filter stays, nothing is shut down, the writer's writes keep landing (its hot block advances,
# read back with O_DIRECT through the filesystem), and buffered writes well over the dirty limit
# are written back and synced (the disk's writeback must outlive it). Sets UNPLUG_BUF_MD5.
unplug_served() {
	_pci=$(pci_of "$1")
	_refs=$(module_refs)
	dmesg -c >/dev/null
	if [ "${UNPLUG:-sysfs}" = qmp ]; then
		# The host's qmp-unplug.py sends QEMU `device_del` (ACPI PCI hotplug).
		step "unplug $1 from the host (QMP device_del dev-$(basename "$1")) with the filesystem mounted and written"
		echo "BLKMIG-QMP-DEVICE-DEL dev-$(basename "$1")"
		wait_until 30 "$1 to be unplugged by the host" _gone "$1"
	else
		step "remove $1's PCI device ($_pci) with the filesystem mounted and written"
		echo 1 >"$_pci/remove" || fail "PCI remove of $1 failed"
		wait_until 10 "$1 to disappear" _gone "$1"
	fi
	dmesg | sed 's/^/  kernel: /' | tail -n 8
	dmesg | grep -q "$(basename "$1"): removed; filter blkmig serves it until its last close" ||
		fail "the kernel did not say the filter keeps $1"
	dmesg | grep -Eiq 'shut ?down|EXT4-fs error|I/O error|Buffer I/O' &&
		fail "the filesystem saw an error or was shut down: $(dmesg | grep -Ei 'shut|error' | head -n3 | tr '\n' ' ')"
	expect_eq "$(module_refs)" "$_refs" "blkmig references after the removal (the filter stays)"
	run_capture migrate status "$1"
	[ "$RC" -eq 0 ] || fail "migrate status $1 failed after the removal (exit $RC): $(errtail "$ERR")"
	grep -q "source removed, served by $2" "$OUT" || fail "migrate status does not say the source is served by $2: $(errtail "$OUT")"
	grep -q "mounted on $3" "$OUT" || fail "migrate status does not name the mount $3: $(errtail "$OUT")"

	step "the writer keeps writing through the kept device, to $2"
	_h0=$(hot_seq "$SW_FILE" "$HOT")
	sleep 2
	sw_alive
	_h1=$(hot_seq "$SW_FILE" "$HOT")
	echo "  hot block's stamp: $_h0 -> $_h1 in 2 s"
	[ "${_h1:-0}" -gt "${_h0:-0}" ] || fail "the writer's hot block did not advance after the removal ($_h0 -> $_h1)"

	step "buffered writes far over the dirty limit are written back (bounded: 90 s)"
	echo 4194304 >/proc/sys/vm/dirty_background_bytes
	echo 8388608 >/proc/sys/vm/dirty_bytes
	dd if=/dev/urandom of=/tmp/chunk bs=1M count=1 2>/dev/null
	_i=0
	while [ $_i -lt 40 ]; do cat /tmp/chunk; _i=$((_i + 1)); done | md5sum | cut -d' ' -f1 >/tmp/buf.md5
	UNPLUG_BUF_MD5=$(cat /tmp/buf.md5)
	timeout 90 sh -c 'i=0; while [ $i -lt 40 ]; do cat /tmp/chunk; i=$((i + 1)); done >'"$3"'/buffered.dat' ||
		fail "40 MiB of buffered writes did not finish in 90 s after the removal (writeback stalled?)"
	timeout 60 sync || fail "sync did not finish in 60 s after the removal"
	echo "  40 MiB written back and synced"
	sw_alive
}
_gone() {
	[ ! -e "/sys/block/$(basename "$1")" ] && [ ! -b "$1" ]
}

# last_close_detaches MNT REFS: unmounting MNT (the last opener of the removed source) detaches
# the filter before umount returns (the target is free to mount at once): the module's
# references are REFS right after it
last_close_detaches() {
	step "umount $1: the last close detaches the filter before umount returns"
	must umount "$1"
	expect_eq "$(module_refs)" "$2" "blkmig references right after umount (the filter is detached)"
	dmesg | grep -q 'blkmig: detached' || fail "the module did not say it detached"
}
_refs_are() {
	[ "$(module_refs)" = "$1" ]
}

# expect_exit_within PID SECS WHAT: process PID ends within SECS seconds
expect_exit_within() {
	wait_until "$2" "$3 to end" _pid_gone "$1"
}
_pid_gone() {
	! kill -0 "$1" 2>/dev/null
}

# expect_migrate_failed PID LOG SRC WHEN: the background `migrate start` PID (output in LOG)
# ends within 30 s, fails, and its error names SRC (WHEN says what happened, for the messages)
expect_migrate_failed() {
	expect_exit_within "$1" 30 "migrate start ($4)"
	wait "$1"
	_rc=$?
	sed 's/^/  migrate: /' "$2" | tail -n 4
	[ "$_rc" -ne 0 ] || fail "migrate start exited 0 although $4"
	grep -q "$(basename "$3")" "$2" || fail "migrate's error does not name $3: $(errtail "$2")"
}

# unplug_flow: the retire-unplug scenarios: a busy ext4 on vda migrated to vdb and switched,
# vda unplugged (UNPLUG=sysfs or qmp) under it, the writer stopped, umount (the last close
# detaches), then the target checked: every stamp, and the buffered file written after the unplug
unplug_flow() {
	HOT=100
	SW_ARGS="--hot $HOT --gap-us 500"
	live_begin /dev/vda
	_refs0=$(module_refs)
	live_start /dev/vda /dev/vdb
	expect_mode /dev/vda redirect
	unplug_served /dev/vda /dev/vdb /mnt/src
	step "stop the writer: no write failed"
	sw_stop
	last_close_detaches /mnt/src "$_refs0"
	live_check_target /dev/vdb
	must mount -t ext4 /dev/vdb /mnt/tgt
	expect_eq "$(md5sum /mnt/tgt/buffered.dat | cut -d' ' -f1)" "$UNPLUG_BUF_MD5" "md5 of the buffered file on the target"
	must umount /mnt/tgt
	unload_module
}
