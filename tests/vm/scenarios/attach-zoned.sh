#!/bin/sh
# attach-zoned: a zoned device (a host-managed null_blk) is refused as a source and as a target
# (EOPNOTSUPP: zone append and zone resets would write without going through the region
# accounting), and nothing is attached.
# disks: 1G 1G
# append: null_blk.zoned=1 null_blk.nr_devices=1 null_blk.gb=1
# needs: module migrate
# timeout: 120
. /tests/lib.sh

load_module
[ -b /dev/nullb0 ] || fail "no /dev/nullb0 (null_blk)"
expect_eq "$(cat /sys/block/nullb0/queue/zoned)" host-managed "zoned model of nullb0"
step "a zoned source"
expect_errno EOPNOTSUPP migrate attach /dev/nullb0 /dev/vda
grep -qi zoned "$ERR" || fail "the refusal does not say zoned: $(head -c 300 "$ERR" | tr '\n' ' ')"
expect_no_filter /dev/nullb0
step "a zoned target"
expect_errno EOPNOTSUPP migrate attach /dev/vda /dev/nullb0
grep -qi zoned "$ERR" || fail "the refusal does not say zoned: $(head -c 300 "$ERR" | tr '\n' ' ')"
expect_no_filter /dev/vda
unload_module
