#!/bin/sh
# attach-passthrough: attaching blkmig to a mounted, busy ext4 and detaching it again changes
# nothing for the filesystem: a background writer keeps writing (buffered and O_DIRECT, with
# in-place rewrites and syncs) before, during and after the attachment, reads verify while
# attached, `migrate status` reports clone and counts the writes (writes_seen > 0), and
# afterwards fsck is clean and every file has the content that was written.
# disks: 256M 256M
# needs: module migrate
# timeout: 240
. /tests/lib.sh

load_module

step "ext4 on the source, background writer"
must mkfs.ext4 -q -F /dev/vda
must mount -t ext4 /dev/vda /mnt/src
mkdir -p /mnt/src/data
writer_start /mnt/src/data
writer_wait_count 10

step "attach vda -> vdb while the writer runs"
run_capture migrate attach /dev/vda /dev/vdb
[ "$RC" -eq 0 ] || fail "migrate attach /dev/vda /dev/vdb failed (exit $RC): $(head -c 300 "$ERR" | tr '\n' ' ')"
n_attach=$(writer_count)
expect_mode /dev/vda clone

step "I/O while attached (writer at $n_attach files)"
for round in 1 2 3; do
	writer_wait_count $((n_attach + round * 10))
	check_sums_upto $((n_attach - 4))
	dd if=/dev/vda of=/dev/null bs=1M count=64 iflag=direct 2>/dev/null || fail "O_DIRECT read of /dev/vda failed"
	expect_mode /dev/vda clone
done
n_detach=$(writer_count)
must sync
writes_seen=$(status_field /dev/vda writes_seen)
[ "$n_detach" -ge $((n_attach + 30)) ] || fail "writer made too little progress while attached"

step "detach (writer at $n_detach files)"
run_capture migrate detach /dev/vda
[ "$RC" -eq 0 ] || fail "migrate detach /dev/vda failed (exit $RC): $(head -c 300 "$ERR" | tr '\n' ' ')"
expect_no_filter /dev/vda

step "writing after detach"
writer_wait_count $((n_detach + 10))
writer_stop
check_all_sums

step "unmount, fsck, remount, verify from disk"
must umount /mnt/src
recheck_from_disk /dev/vda check_all_sums
unload_module
# Last, so that the data checks above run in any case: the writes went through the filter.
[ "${writes_seen:-0}" -gt 0 ] ||
	fail "status reported writes_seen=${writes_seen:-<missing>} after $((n_detach - n_attach)) files written while attached: the filter did not see (or count) the writes"
echo "ok: $(writer_count) files, $((n_detach - n_attach)) written while attached"
