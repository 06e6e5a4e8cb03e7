#!/bin/sh
# live-sparse-fs: a 1 GiB ext4 about 10% full (90 MiB of files and stampwriter's file, rewritten
# all the time; its free space holds old data, as on a used disk) is migrated twice from the same live source: first with --full-copy to vdc
# (copy and mirror, no switch, then abort), then with the default settings to vdb, which skip
# the filesystem's free space (FS_IOC_GETFSMAP) and switch. The default run must write at least
# 4x fewer bytes than the full copy; both byte counts and times are printed. After the switch
# the target is fsck-clean, every stamp is the last one written, and every file's md5 matches.
# disks: 1G 1G 1G
# needs: module migrate
# timeout: 1500
. /tests/lib.sh
. /tests/live-lib.sh

SRC=/dev/vda
TGT=/dev/vdb
FULL_TGT=/dev/vdc

# run_json NAME ARGS...: `migrate start ARGS... --json`, must exit 0; sets RUN_BYTES (bytes
# written to the target, data and write-zeroes), RUN_SKIPPED (free space skipped), RUN_SECS
run_json() {
	_name=$1
	shift
	step "migrate start $* --json ($_name)"
	_t0=$(cs_now)
	migrate start "$@" --json >/tmp/"$_name".json 2>/tmp/"$_name".err
	_rc=$?
	RUN_SECS=$(echo "$_t0 $(cs_now)" | awk '{ printf "%.1f", ($2 - $1) / 100 }')
	sed 's/^/  /' /tmp/"$_name".err
	[ "$_rc" -eq 0 ] || fail "migrate start $* failed (exit $_rc): $(errtail /tmp/"$_name".err)"
	# Every line, from the real module, as docs/json.md documents it.
	stampwriter jsondoc /tests/json.md progress start-done </tmp/"$_name".json >/tmp/jsondoc.out 2>&1 ||
		fail "migrate start --json ($_name) does not match docs/json.md: $(errtail /tmp/jsondoc.out)"
	grep -q '"event":"progress"' /tmp/"$_name".json || fail "migrate start --json ($_name) printed no progress line"
	_done=$(grep '"bytes_copied"' /tmp/"$_name".json | tail -n1)
	RUN_BYTES=$(echo "$_done" | sed -n 's/.*"bytes_copied":\([0-9]*\).*/\1/p')
	RUN_SKIPPED=$(echo "$_done" | sed -n 's/.*"bytes_skipped_free":\([0-9]*\).*/\1/p')
	_zeroed=$(echo "$_done" | sed -n 's/.*"bytes_zeroed":\([0-9]*\).*/\1/p')
	# Written in any way: data, and write-zeroes.
	RUN_BYTES=$((RUN_BYTES + ${_zeroed:-0}))
	[ -n "$RUN_BYTES" ] && [ -n "$RUN_SKIPPED" ] || fail "no summary from migrate start $*: $(errtail /tmp/"$_name".json)"
	# A run that switched kept its pause within its budget (the default 100 ms here).
	! grep -q '"mode":"redirect"\|^switched' /tmp/"$_name".json /tmp/"$_name".err ||
		live_check_pause /tmp/"$_name".json "$@"
	echo "  $_name: wrote $RUN_BYTES bytes ($_zeroed of them zeroed), skipped $RUN_SKIPPED bytes of free space, in ${RUN_SECS}s"
	sw_alive
}

live_begin "$SRC"
# A used disk: its free space holds old data (not zeroes, which a fresh image reads as and
# the copier would find already on the fresh targets).
# Written 50 MiB at a time, synced and dropped from the cache each time: the guest has 512 MiB.
step "old data in the free space: 800 MiB of files, written and deleted"
i=1
while [ "$i" -le 16 ]; do
	yes blkmig-old-data | dd of=/mnt/src/old$i bs=1M count=50 iflag=fullblock conv=fsync 2>/dev/null ||
		fail "cannot write /mnt/src/old$i"
	drop_caches
	i=$((i + 1))
done
must rm /mnt/src/old*
must sync
step "90 MiB of files on the filesystem"
i=1
while [ "$i" -le 9 ]; do
	must dd if=/dev/urandom of=/mnt/src/file$i bs=1M count=10
	i=$((i + 1))
done
(cd /mnt/src && md5sum file*) >/tmp/files.md5
must sync
df -k /mnt/src | sed 's/^/  /'

run_json full "$SRC" "$FULL_TGT" --full-copy --no-switch
FULL_BYTES=$RUN_BYTES
FULL_SECS=$RUN_SECS
expect_eq "$RUN_SKIPPED" 0 "free space skipped by --full-copy"
grep -q '"event":"progress".*"bytes_skipped_free"' /tmp/full.json || fail "the progress has no bytes_skipped_free"
step "abort the full copy"
run_capture migrate abort "$SRC"
[ "$RC" -eq 0 ] || fail "migrate abort $SRC failed (exit $RC): $(errtail "$ERR")"
expect_no_filter "$SRC"

run_json sparse "$SRC" "$TGT"
SPARSE_BYTES=$RUN_BYTES
SPARSE_SECS=$RUN_SECS
grep -q '^switched:' /tmp/sparse.err || fail "the default run did not switch: $(errtail /tmp/sparse.err)"
[ "$RUN_SKIPPED" -gt 0 ] || fail "the default run skipped no free space"
echo "BLKMIG-SPARSE full_bytes=$FULL_BYTES full_secs=$FULL_SECS sparse_bytes=$SPARSE_BYTES sparse_secs=$SPARSE_SECS skipped=$RUN_SKIPPED"
[ "$SPARSE_BYTES" -gt 0 ] || fail "the default run copied nothing"
[ $((SPARSE_BYTES * 4)) -le "$FULL_BYTES" ] ||
	fail "the default run wrote $SPARSE_BYTES bytes, not 4x fewer than --full-copy's $FULL_BYTES"

live_finish "$SRC" "$TGT"
step "every file on the target has its md5"
must mount -t ext4 "$TGT" /mnt/tgt
(cd /mnt/tgt && md5sum -c /tmp/files.md5) >/tmp/md5.out 2>&1 || {
	cat /tmp/md5.out
	fail "files differ on the target"
}
must umount /mnt/tgt
unload_module
echo "ok: the default run wrote $SPARSE_BYTES bytes in ${SPARSE_SECS}s, --full-copy $FULL_BYTES bytes in ${FULL_SECS}s"
