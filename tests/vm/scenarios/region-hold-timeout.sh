#!/bin/sh
# region-hold-timeout: a copier that begins a held copy (COPY_BEGIN with REGION_OP_HOLD, from
# `stampwriter abi copy-begin-held`) and dies before its COPY_END. The hold timeout is 3 s, but a
# region hold lasts 1 s at most: a write to the held region waits until the module's timer ends
# the hold (0.3 s .. 2 s after it was issued), then completes, on the source; a write to another
# region meanwhile completes at once (under 0.5 s);
# STATUS counts the hold and the write it kept, and nothing stays held: a new held copy of the
# region begins, and its COPY_END ends it. Refused first, with nothing held: a COPY_BEGIN whose
# second op has an undefined flag, one that holds two regions (one region hold a call: each may
# wait up to its limit), and a held copy of the head's region.
# disks: 64M 64M
# needs: module migrate
# timeout: 120
. /tests/lib.sh
. /tests/live-lib.sh

_one_held() {
	[ "$(status_field /dev/vda region_writes_held)" = 1 ]
}

load_module
must migrate attach /dev/vda /dev/vdb --hold-timeout 3s
expect_mode /dev/vda clone

step "a COPY_BEGIN whose second op has an undefined flag is refused before anything is held"
expect_eq "$(stampwriter abi copy-begin-held-bad /dev/vda 5)" EINVAL "COPY_BEGIN (held region 5, bad flag on 6)"
expect_eq "$(status_field /dev/vda region_holds)" 0 "region_holds after the refused COPY_BEGIN"
t1=$(cs_now)
direct_io /dev/vda $((5 * 2048)) E 8 4096
early=$(($(cs_now) - t1))
echo "  a write to region 5 after the refused COPY_BEGIN took $((early * 10)) ms"
[ "$early" -lt 50 ] || fail "a write to region 5 took $((early * 10)) ms after a refused COPY_BEGIN: it was held"

step "a COPY_BEGIN with two held regions is refused: one region hold a call"
expect_eq "$(stampwriter abi copy-begin-held-two /dev/vda 5)" EINVAL "COPY_BEGIN (held regions 5 and 6)"
expect_eq "$(status_field /dev/vda region_holds)" 0 "region_holds after the two-hold COPY_BEGIN"

step "a held copy of the head's region is refused"
expect_eq "$(stampwriter abi copy-begin-held /dev/vda 0)" EINVAL "COPY_BEGIN (held region 0)"
expect_eq "$(status_field /dev/vda region_holds)" 0 "region_holds after the head's"

step "a held copy of region 5 begins, and its copier goes"
set -- $(stampwriter abi copy-begin-held /dev/vda 5)
expect_eq "$1" 0 "COPY_BEGIN result (held)"
expect_eq "$(status_field /dev/vda region_holds)" 1 "region_holds"

step "a write to region 5 waits for the timer; one to region 20 does not"
t0=$(cs_now)
(stampwriter dio-write /dev/vda $((5 * 2048)) H 8 --bs 4096 >/tmp/held.out 2>&1; echo $? >/tmp/held.rc; cs_now >/tmp/held.end) &
HPID=$!
wait_until 2 "the write to region 5 to be held" _one_held
t1=$(cs_now)
direct_io /dev/vda $((20 * 2048)) F 8 4096
other=$(($(cs_now) - t1))
echo "  the write to region 20 took $((other * 10)) ms (with the write to region 5 held)"
[ "$other" -lt 50 ] || fail "a write to another region took $((other * 10)) ms while region 5 was held"
kill -0 "$HPID" 2>/dev/null || fail "the write to the held region 5 finished before the other one"
wait "$HPID"
expect_eq "$(cat /tmp/held.rc)" 0 "exit status of the held write ($(tr '\n' ' ' </tmp/held.out))"
held=$(($(cat /tmp/held.end) - t0))
echo "  the write to region 5 took $((held * 10)) ms"
[ "$held" -ge 30 ] || fail "the write to the held region took only $((held * 10)) ms: it was not held"
[ "$held" -lt 200 ] || fail "the write to the held region took $((held * 10)) ms: the region hold's 1 s limit did not end it"
expect_eq "$(status_field /dev/vda writes_held)" 0 "writes held"
ns=$(status_field /dev/vda region_hold_longest_ns)
echo "  region_hold_longest_ns $ns"
[ "${ns:-0}" -ge 300000000 ] || fail "region_hold_longest_ns $ns: the write did not wait for the timer"
[ "$ns" -lt 1500000000 ] || fail "region_hold_longest_ns $ns: longer than the region hold's 1 s limit"
expect_eq "$(dd if=/dev/vda bs=512 skip=$((5 * 2048)) count=1 iflag=direct 2>/dev/null | head -c 1)" H "the held write's first byte on the source"

step "the hold is over: a new held copy of region 5 begins, its COPY_END ends it"
set -- $(stampwriter abi copy-begin-held /dev/vda 5)
expect_eq "$1" 0 "second COPY_BEGIN result (held)"
expect_eq "$(stampwriter abi copy-end /dev/vda 5 "$2")" 0 "COPY_END result (0 = committed, nothing was written)"
expect_eq "$(status_field /dev/vda region_holds)" 2 "region_holds"
direct_io /dev/vda $((5 * 2048)) G 8 4096
expect_eq "$(status_field /dev/vda region_writes_held)" 1 "writes that waited in a region hold (the second hold kept none)"
must migrate detach /dev/vda
unload_module
echo "ok: held write $((held * 10)) ms, other write $((other * 10)) ms"
