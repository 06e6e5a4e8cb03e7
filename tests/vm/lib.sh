# Helpers for the blkmig VM scenarios (sourced by busybox sh in the guest: `. /tests/lib.sh`).
#
# Conventions: a scenario checks everything it relies on and calls `fail REASON` at the first
# broken expectation (the reason ends up on the BLKMIG-VM-RESULT line). Reaching the end of the
# script (exit 0) is a PASS. Everything printed goes to the serial log.

BLKMIG_FAIL_FILE=/tmp/blkmig-fail-reason
T0=$(cut -d' ' -f1 /proc/uptime)

# step MSG: announce a step (with the guest uptime, for timings in the log)
step() {
	echo "[$(cut -d' ' -f1 /proc/uptime)s] == $*"
}

# fail REASON: record the reason and end the scenario. Call it from the scenario's own shell
# (not from inside $(...) or a pipeline, where `exit` only leaves the subshell).
fail() {
	echo "FAIL: $*" >&2
	[ -s "$BLKMIG_FAIL_FILE" ] || echo "$*" >"$BLKMIG_FAIL_FILE"
	exit 1
}

# must CMD ARGS...: run a command that has to succeed
must() {
	"$@" || fail "command failed (exit $?): $*"
}

# expect_eq GOT WANT WHAT
expect_eq() {
	[ "$1" = "$2" ] || fail "$3: got '$1', want '$2'"
}

# run_capture CMD ARGS...: run CMD, keep its stdout/stderr in $OUT/$ERR files and its exit code
# in $RC, echo both to the log. Never fails by itself.
OUT=/tmp/cmd.out
ERR=/tmp/cmd.err
run_capture() {
	"$@" >"$OUT" 2>"$ERR"
	RC=$?
	echo "\$ $* -> exit $RC"
	sed 's/^/  stdout: /' "$OUT"
	sed 's/^/  stderr: /' "$ERR"
	return 0
}

# expect_errno ERRNO_REGEX CMD ARGS...: CMD must fail (non-zero exit) and its stderr must name
# the errno in parentheses, e.g. `expect_errno 'EBUSY|EALREADY' migrate attach ...`.
expect_errno() {
	_want=$1
	shift
	run_capture "$@"
	[ "$RC" -ne 0 ] || fail "expected '$*' to fail with ($_want), it succeeded"
	grep -qE "\\(($_want)\\)" "$ERR" || fail "'$*' failed (exit $RC) but stderr does not name ($_want): $(head -c 300 "$ERR" | tr '\n' ' ')"
}

# expect_fail_msg TEXT CMD ARGS...: CMD fails and its stderr contains TEXT
expect_fail_msg() {
	_want=$1
	shift
	run_capture "$@"
	[ "$RC" -ne 0 ] || fail "expected '$*' to fail ($_want), it succeeded"
	grep -qF "$_want" "$ERR" || fail "'$*' failed (exit $RC) but stderr does not say '$_want': $(head -c 300 "$ERR" | tr '\n' ' ')"
}

# --- migrate CLI ----------------------------------------------------------------------------

# status_mode DEV: print the mode from `migrate status DEV --json` (empty if it failed)
status_mode() {
	migrate status "$1" --json 2>/dev/null | sed -n 's/.*"mode"[[:space:]]*:[[:space:]]*"\([a-z_]*\)".*/\1/p' | head -n1
}

# status_field DEV FIELD: an integer field of `migrate status DEV --json` (empty if absent)
status_field() {
	migrate status "$1" --json 2>/dev/null | sed -n "s/.*\"$2\"[[:space:]]*:[[:space:]]*\([0-9]*\).*/\1/p" | head -n1
}

# expect_mode DEV MODE: `migrate status DEV --json` works and reports MODE
expect_mode() {
	run_capture migrate status "$1" --json
	[ "$RC" -eq 0 ] || fail "migrate status $1 --json failed (exit $RC): $(head -c 300 "$ERR" | tr '\n' ' ')"
	_mode=$(sed -n 's/.*"mode"[[:space:]]*:[[:space:]]*"\([a-z_]*\)".*/\1/p' "$OUT" | head -n1)
	expect_eq "$_mode" "$2" "mode of $1"
	run_capture migrate status "$1"
	[ "$RC" -eq 0 ] || fail "migrate status $1 failed (exit $RC)"
}

# expect_no_filter DEV: blkmig is not attached to DEV: `migrate status DEV --json` reports the
# "detached" mode (what the disk holds, read from the disk), and the text says so
expect_no_filter() {
	run_capture migrate status "$1" --json
	[ "$RC" -eq 0 ] || fail "migrate status $1 --json failed (exit $RC): $(head -c 300 "$ERR" | tr '\n' ' ')"
	grep -q '"mode":"detached"' "$OUT" || fail "migrate status $1: blkmig should not be attached: $(head -c 300 "$OUT" | tr '\n' ' ')"
	run_capture migrate status "$1"
	grep -q 'not attached' "$OUT" || fail "migrate status $1 does not say that blkmig is not attached: $(head -c 300 "$OUT" | tr '\n' ' ')"
}

load_module() {
	[ -f /blkmig.ko ] || fail "/blkmig.ko is not in the initramfs"
	command -v migrate >/dev/null || fail "migrate is not in the initramfs"
	must insmod /blkmig.ko
}

# unload_module: rmmod must work once every filter is detached
unload_module() {
	must rmmod blkmig
}

# --- data patterns ---------------------------------------------------------------------------

# pattern TAG NSECT: NSECT 512-byte sectors, each one "TAG <sector index>" padded with spaces
# and ended by a newline. Any sector landing at a wrong offset changes the md5 of its area.
pattern() {
	awk -v tag="$1" -v n="$2" 'BEGIN { for (i = 0; i < n; i++) printf "%-511s\n", sprintf("%s %010d", tag, i) }'
}

# write_pattern DEV SECTOR TAG NSECT: write pattern TAG at sector offset SECTOR of DEV (O_DIRECT)
write_pattern() {
	pattern "$3" "$4" >/tmp/pattern.bin
	dd if=/tmp/pattern.bin of="$1" bs=64k seek=$(($2 * 512)) oflag=seek_bytes,direct conv=notrunc 2>/tmp/dd.err ||
		fail "writing pattern $3 to $1 at sector $2 failed: $(cat /tmp/dd.err)"
	rm -f /tmp/pattern.bin
}

# read_md5 DEV SECTOR NSECT: md5 of NSECT sectors at SECTOR, read with O_DIRECT (not the cache)
read_md5() {
	dd if="$1" bs=512 skip="$2" count="$3" iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1
}

# expect_pattern DEV SECTOR TAG NSECT: the area holds exactly pattern TAG
expect_pattern() {
	_got=$(read_md5 "$1" "$2" "$4")
	_want=$(pattern "$3" "$4" | md5sum | cut -d' ' -f1)
	[ "$_got" = "$_want" ] || fail "$1 sectors $2+$4: content is not pattern '$3'"
}

# drop_caches: write back and forget every cached block (so reads go to the disks)
drop_caches() {
	sync
	for d in /dev/vd*; do blockdev --flushbufs "$d" 2>/dev/null; done
	echo 3 >/proc/sys/vm/drop_caches
}

# dev_sectors DEV: size in 512-byte sectors
dev_sectors() {
	blockdev --getsz "$1"
}

# --- MBR partition table (no sfdisk needed) --------------------------------------------------

_le32() { # print a 32-bit little-endian integer as 4 raw bytes
	printf "\\$(printf %03o $(($1 & 255)))\\$(printf %03o $((($1 >> 8) & 255)))\\$(printf %03o $((($1 >> 16) & 255)))\\$(printf %03o $((($1 >> 24) & 255)))"
}
_mbr_entry() { # START SIZE: one primary Linux partition entry (LBA only, CHS = 0xfe ff ff)
	printf '\000\376\377\377\203\376\377\377'
	_le32 "$1"
	_le32 "$2"
}

# write_mbr DEV START1 SIZE1 [START2 SIZE2 ...]: a DOS partition table with up to 4 primary
# partitions (sectors), written to sector 0 only, then re-read by the kernel.
write_mbr() {
	_dev=$1
	shift
	{
		dd if=/dev/zero bs=446 count=1 2>/dev/null
		_n=0
		while [ $# -ge 2 ]; do
			_mbr_entry "$1" "$2"
			shift 2
			_n=$((_n + 1))
		done
		while [ $_n -lt 4 ]; do
			dd if=/dev/zero bs=16 count=1 2>/dev/null
			_n=$((_n + 1))
		done
		printf '\125\252'
	} >/tmp/mbr.bin
	[ "$(stat -c %s /tmp/mbr.bin)" = 512 ] || fail "MBR image is $(stat -c %s /tmp/mbr.bin) bytes, not 512"
	must dd if=/tmp/mbr.bin of="$_dev" bs=512 count=1 conv=notrunc,fsync 2>/dev/null
	must blockdev --rereadpt "$_dev"
	sleep 1 # let devtmpfs create the partition nodes
}

# --- ext4 files with known content ------------------------------------------------------------

# make_file PATH KIB: write KIB KiB of random data to PATH and record its md5 in /tmp/md5s
make_file() {
	dd if=/dev/urandom of="$1" bs=1k count="$2" 2>/dev/null || return 1
	md5sum "$1" >>/tmp/md5s
}

# check_md5s [LIST]: every file in the md5 list (default /tmp/md5s) still has its content
check_md5s() {
	_list=${1:-/tmp/md5s}
	[ -s "$_list" ] || fail "no files recorded in $_list"
	md5sum -c "$_list" >/tmp/md5check.out 2>&1 ||
		fail "md5 mismatch: $(grep -v ': OK$' /tmp/md5check.out | head -n3 | tr '\n' ' ')"
	echo "  $(wc -l <"$_list") files verified"
}

# fsck_clean DEV: the filesystem on DEV (unmounted) is consistent
fsck_clean() {
	fsck.ext4 -fn "$1" >/tmp/fsck.out 2>&1
	_rc=$?
	if [ $_rc -ne 0 ]; then
		cat /tmp/fsck.out
		fail "fsck.ext4 -fn $1 reports problems (exit $_rc)"
	fi
}

# recheck_from_disk DEV CHECK: the unmounted filesystem on DEV is fsck-clean, and once mounted
# again with the page cache dropped (so data comes from the device), CHECK passes; unmounts.
recheck_from_disk() {
	fsck_clean "$1"
	drop_caches
	must mount -t ext4 "$1" /mnt/src
	$2
	must umount /mnt/src
}

# wait_until SECONDS DESCRIPTION CMD ARGS...: poll CMD (every 0.2 s) until it succeeds
wait_until() {
	_limit=$1
	_what=$2
	shift 2
	_i=0
	while ! "$@"; do
		_i=$((_i + 1))
		[ $_i -le $((_limit * 5)) ] || fail "timed out after ${_limit}s waiting for: $_what"
		sleep 0.2
	done
}

# --- background writer on a mounted filesystem -------------------------------------------------
# writer_start DIR: start a shell loop that keeps creating files w1, w2, ... of random content in
# DIR (buffered and O_DIRECT, 4-64 KiB, a sync every 4 files) and rewriting, in place, the file
# written 3 steps earlier; each file's md5 is kept in /tmp/sums/<name>.md5 after every write.
# /tmp/writer.n holds the number of files written so far. writer_stop ends it and fails the
# scenario if any write failed.
writer_start() {
	rm -rf /tmp/sums /tmp/writer.stop /tmp/writer.err
	mkdir -p /tmp/sums
	echo 0 >/tmp/writer.n
	(
		i=0
		while [ ! -e /tmp/writer.stop ]; do
			i=$((i + 1))
			flag=
			[ $((i % 2)) -eq 1 ] && flag=oflag=direct
			dd if=/dev/urandom of="$1/w$i" bs=4k count=$((i % 16 + 1)) $flag 2>/tmp/writer.dd ||
				{ echo "write $1/w$i failed: $(cat /tmp/writer.dd)" >/tmp/writer.err; break; }
			md5sum "$1/w$i" >/tmp/sums/w$i.md5
			if [ $i -gt 3 ]; then
				j=$((i - 3))
				dd if=/dev/urandom of="$1/w$j" bs=4k count=1 seek=$((i % 3)) conv=notrunc 2>/tmp/writer.dd ||
					{ echo "rewrite $1/w$j failed: $(cat /tmp/writer.dd)" >/tmp/writer.err; break; }
				md5sum "$1/w$j" >/tmp/sums/w$j.md5
			fi
			[ $((i % 4)) -eq 0 ] && sync
			# Renamed into place: a reader never sees the file empty, half-written.
			echo $i >/tmp/writer.n.tmp && mv -f /tmp/writer.n.tmp /tmp/writer.n
		done
	) &
	WRITER_PID=$!
}

writer_count() {
	cat /tmp/writer.n
}

# writer_wait_count N: wait until the writer has written at least N files
writer_wait_count() {
	wait_until "${2:-60}" "background writer to reach $1 files (at $(writer_count))" _writer_at "$1"
}
_writer_at() {
	[ -e /tmp/writer.err ] && fail "background writer: $(cat /tmp/writer.err)"
	[ "$(writer_count)" -ge "$1" ]
}

writer_stop() {
	touch /tmp/writer.stop
	wait "$WRITER_PID"
	[ -e /tmp/writer.err ] && fail "background writer: $(cat /tmp/writer.err)"
	sync
	echo "  writer wrote $(writer_count) files"
}

# check_sums_upto N: files w1..wN (their latest recorded content) are intact; safe while the
# writer runs as long as N <= (files written) - 4 (the writer only rewrites w(i-3)).
check_sums_upto() {
	_n=1
	: >/tmp/sums.sel
	while [ $_n -le "$1" ]; do
		cat /tmp/sums/w$_n.md5 >>/tmp/sums.sel
		_n=$((_n + 1))
	done
	check_md5s /tmp/sums.sel
}

# check_all_sums: every file the writer wrote is intact (writer stopped)
check_all_sums() {
	cat /tmp/sums/*.md5 >/tmp/sums.all
	check_md5s /tmp/sums.all
}

# direct_io DEV SECTOR TAG NSECT [BS]: write pattern TAG with O_DIRECT in BS-byte writes (default
# 512); fails the scenario if the kernel refuses O_DIRECT or a write (busybox dd would quietly
# fall back to buffered I/O)
direct_io() {
	stampwriter dio-write "$1" "$2" "$3" "$4" --bs "${5:-512}" >/tmp/dio.out 2>&1 ||
		fail "O_DIRECT write of pattern $3 to $1 at sector $2 failed: $(tr '\n' ' ' </tmp/dio.out)"
}

# --- scenarios of several boots ("# boots: N") -------------------------------------------------
# BLKMIG_BOOT is this boot's number (1..N); /notes is a small filesystem of its own that every
# boot sees.

# note KEY VALUE: keep VALUE for the next boot (durably: only /notes is synced)
note() {
	echo "$2" >"/notes/$1"
	sync -f "/notes/$1"
}

# noted KEY: what an earlier boot kept under KEY (empty if nothing)
noted() {
	cat "/notes/$1" 2>/dev/null
}

# hard_reset: reset the machine now, like a crash: nothing is synced or unmounted (but /notes,
# which is synced first); the next boot of the scenario follows
hard_reset() {
	sync -f /notes
	echo "[$(cut -d' ' -f1 /proc/uptime)s] == hard reset (boot $BLKMIG_BOOT): no sync, no unmount"
	reboot -n -f
	sleep 30
	fail "the machine did not reset"
}
