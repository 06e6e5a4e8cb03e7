#!/bin/sh
# attach-cycle: attach and detach again and again (alternating two targets) under a live ext4
# with a background writer. Every attach and detach works, status follows (clone / no
# filter), the writes keep being seen while attached, and afterwards fsck is clean and every
# file is intact; rmmod works at the end.
# disks: 256M 256M 256M
# needs: module migrate
# timeout: 240
. /tests/lib.sh

load_module
must mkfs.ext4 -q -F /dev/vda
must mount -t ext4 /dev/vda /mnt/src
mkdir -p /mnt/src/data
writer_start /mnt/src/data
writer_wait_count 5

cycles=10
i=1
while [ $i -le $cycles ]; do
	tgt=/dev/vdb
	[ $((i % 2)) -eq 0 ] && tgt=/dev/vdc
	step "cycle $i/$cycles: attach vda -> $tgt (writer at $(writer_count) files)"
	run_capture migrate attach /dev/vda $tgt
	[ "$RC" -eq 0 ] || fail "cycle $i: migrate attach /dev/vda $tgt failed (exit $RC): $(head -c 300 "$ERR" | tr '\n' ' ')"
	expect_eq "$(status_mode /dev/vda)" clone "cycle $i: mode"
	writer_wait_count $(($(writer_count) + 3))
	must sync
	seen=$(status_field /dev/vda writes_seen)
	[ "${seen:-0}" -gt 0 ] || fail "cycle $i: writes_seen=${seen:-<missing>} after writes while attached"
	run_capture migrate detach /dev/vda
	[ "$RC" -eq 0 ] || fail "cycle $i: migrate detach /dev/vda failed (exit $RC): $(head -c 300 "$ERR" | tr '\n' ' ')"
	expect_no_filter /dev/vda
	i=$((i + 1))
done

step "stop the writer, verify"
writer_stop
check_all_sums
must umount /mnt/src
recheck_from_disk /dev/vda check_all_sums
unload_module
echo "ok: $cycles cycles, $(writer_count) files"
