#!/bin/sh
# clone-source-errors: the source fails I/O while it is cloned (fail_make_request on vda: every
# bio submitted to vda fails, those to vdb do not).
# 1. A write to a synced region whose source leg fails while its target leg succeeds: the writer
#    gets the source's error, as it would without blkmig, and the region must stop being in sync
#    (the target now holds data the source does not). The resumed migration copies it again, and
#    after the switch the target holds the source's data, not the failed write.
# 2. The copier's read of the source fails: `migrate start` stops with an error naming the read,
#    nothing is retired, the filter stays in CLONE, and the source is unchanged.
# disks: 64M 64M
# kernel: debug
# needs: module migrate
# timeout: 240
. /tests/lib.sh
. /tests/live-lib.sh

load_module
mount -t debugfs none /sys/kernel/debug 2>/dev/null
fi=/sys/kernel/debug/fail_make_request
[ -d $fi ] || fail "no $fi (CONFIG_FAIL_MAKE_REQUEST, CONFIG_FAULT_INJECTION_DEBUG_FS)"
echo 100 >$fi/probability
echo 1 >$fi/interval
echo -1 >$fi/times
echo 0 >$fi/verbose
inject() { echo "$1" >/sys/block/vda/make-it-fail; }
direct_io /dev/vda 0 A 131072 65536

step "migrate start /dev/vda /dev/vdb --no-switch: every region but the boundary ones in sync"
must migrate start /dev/vda /dev/vdb --no-switch
s0=$(status_field /dev/vda regions_synced)
echo "  regions in sync: $s0"
[ "${s0:-0}" -ge 60 ] || fail "only ${s0:-?} regions in sync after --no-switch"

step "a write to region 5 whose source leg fails and target leg succeeds"
inject 1
stampwriter dio-write /dev/vda 10240 W 2048 --bs 65536 >/tmp/w.out 2>&1 && {
	inject 0
	fail "the write to the failing source succeeded: $(cat /tmp/w.out)"
}
inject 0
echo "  the writer got the source's error: $(tail -c 120 /tmp/w.out | tr '\n' ' ')"
expect_mode /dev/vda clone
s1=$(status_field /dev/vda regions_synced)
echo "  regions in sync: $s0 -> $s1"
[ "${s1:-0}" -lt "$s0" ] || fail "a region whose source write failed is still in sync ($s0 -> $s1)"
expect_pattern /dev/vda 0 A 131072

step "the copier's read of the source fails: migrate stops, nothing retired"
inject 1
run_capture migrate start /dev/vda /dev/vdb --max-pause 500ms
inject 0
[ "$RC" -ne 0 ] || fail "migrate start succeeded while every read of the source failed"
grep -qiE 'read|/dev/vda' "$ERR" || fail "migrate's error does not name the failed read: $(head -c 300 "$ERR" | tr '\n' ' ')"
expect_mode /dev/vda clone
expect_pattern /dev/vda 0 A 131072

step "resume: the region is copied again; after the switch the target holds the source's data"
must migrate start /dev/vda /dev/vdb --max-pause 500ms
must migrate detach /dev/vda
drop_caches
expect_pattern /dev/vdb 0 A 131072
unload_module
