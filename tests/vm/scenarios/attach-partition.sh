#!/bin/sh
# attach-partition: a filter on a partition (/dev/vda2, which starts at an odd sector) sees and
# moves only that partition's I/O: raw patterns, mkfs (with discard), an ext4 with files on
# vda2 while attached, writes to the sibling partition vda1 and to the whole disk, and after
# the detach every area (MBR, the gaps before/between/after the partitions, vda1, the end of the
# disk) holds exactly what was written there, and vda2's filesystem is clean and intact.
# While vda2 has a filter, the whole disk vda cannot get one (EBUSY).
# disks: 256M 256M 256M
# needs: module migrate
# timeout: 300
. /tests/lib.sh

# Layout of vda (512-byte sectors)
G0=1          G0N=2047     # gap before vda1 (after the MBR)
P1=2048       P1N=32768    # vda1: 16 MiB
G1=34816      G1N=2111     # gap between: 1 MiB + 63 sectors (vda2 is not 4K-aligned)
P2=36927      P2N=131072   # vda2: 64 MiB
G2=167999     G2N=8192     # 4 MiB after vda2
END=522240    ENDN=2048    # last MiB of the disk: never written, must stay zero
zero_md5=$(dd if=/dev/zero bs=512 count=$ENDN 2>/dev/null | md5sum | cut -d' ' -f1)

load_module

step "partition vda (MBR: vda1 @$P1+$P1N, vda2 @$P2+$P2N)"
write_mbr /dev/vda $P1 $P1N $P2 $P2N
expect_eq "$(cat /sys/class/block/vda2/start)" $P2 "start of vda2"
expect_eq "$(cat /sys/class/block/vda2/size)" $P2N "size of vda2"
expect_eq "$(cat /sys/class/block/vda1/start)" $P1 "start of vda1"
mbr_md5=$(read_md5 /dev/vda 0 1)

step "known patterns everywhere"
write_pattern /dev/vda $G0 GAP0 $G0N
write_pattern /dev/vda $G1 GAP1 $G1N
write_pattern /dev/vda $G2 GAP2 $G2N
write_pattern /dev/vda1 0 PART1 $P1N
write_pattern /dev/vda2 0 PART2HEAD 16384
write_pattern /dev/vda2 $((P2N - 2048)) PART2TAIL 2048
drop_caches
expect_pattern /dev/vda $((P1 + 0)) PART1 $P1N
expect_pattern /dev/vda $P2 PART2HEAD 16384

step "attach vda2 -> vdb"
run_capture migrate attach /dev/vda2 /dev/vdb
[ "$RC" -eq 0 ] || fail "migrate attach /dev/vda2 /dev/vdb failed (exit $RC): $(head -c 300 "$ERR" | tr '\n' ' ')"
expect_mode /dev/vda2 clone
expect_no_filter /dev/vda1

step "the whole disk cannot get a filter while a partition has one"
expect_errno EBUSY migrate attach /dev/vda /dev/vdc
expect_no_filter /dev/vda
expect_mode /dev/vda2 clone

step "reads through the filter"
expect_pattern /dev/vda2 0 PART2HEAD 16384
expect_pattern /dev/vda2 $((P2N - 2048)) PART2TAIL 2048

step "raw writes to vda2 through the filter (odd offset, up to the partition's last sector)"
write_pattern /dev/vda2 100 RAWMID 3000
write_pattern /dev/vda2 $((P2N - 1000)) RAWEND 1000
drop_caches
expect_pattern /dev/vda2 100 RAWMID 3000
expect_pattern /dev/vda $((P2 + 100)) RAWMID 3000
expect_pattern /dev/vda $((P2 + P2N - 1000)) RAWEND 1000
expect_pattern /dev/vda $G2 GAP2 $G2N
expect_pattern /dev/vda $G1 GAP1 $G1N

step "sibling partition and whole disk while vda2 is attached (vda2's filter must not see them)"
seen_before=$(status_field /dev/vda2 writes_seen)
[ "${seen_before:-0}" -gt 0 ] || fail "writes_seen of vda2's filter is ${seen_before:-<missing>} after raw writes to vda2"
write_pattern /dev/vda1 0 PART1NEW $P1N
write_pattern /dev/vda $((G2 + G2N - 64)) GAP2END 64
seen_after=$(status_field /dev/vda2 writes_seen)
expect_eq "$seen_after" "$seen_before" "writes_seen of vda2's filter across writes to vda1 and the gap after vda2"

step "ext4 on vda2 while attached"
must mkfs.ext4 -q -F /dev/vda2
must mount -t ext4 /dev/vda2 /mnt/src
mkdir -p /mnt/src/d
for i in 1 2 3 4 5 6 7 8 9 10; do make_file /mnt/src/d/f$i $((i * 200)) || fail "write f$i on vda2"; done
must sync
check_md5s
must umount /mnt/src
expect_mode /dev/vda2 clone
writes_seen=$(status_field /dev/vda2 writes_seen)

step "detach"
run_capture migrate detach /dev/vda2
[ "$RC" -eq 0 ] || fail "migrate detach /dev/vda2 failed (exit $RC): $(head -c 300 "$ERR" | tr '\n' ' ')"
expect_no_filter /dev/vda2

step "every area holds exactly what was written to it"
drop_caches
expect_eq "$(read_md5 /dev/vda 0 1)" "$mbr_md5" "MBR (sector 0)"
expect_pattern /dev/vda $G0 GAP0 $G0N
expect_pattern /dev/vda $P1 PART1NEW $P1N
expect_pattern /dev/vda1 0 PART1NEW $P1N
expect_pattern /dev/vda $G1 GAP1 $G1N
expect_pattern /dev/vda $G2 GAP2 $((G2N - 64))
expect_pattern /dev/vda $((G2 + G2N - 64)) GAP2END 64
expect_eq "$(read_md5 /dev/vda $END $ENDN)" "$zero_md5" "last MiB of vda (never written)"
expect_eq "$(cat /sys/class/block/vda2/start)" $P2 "start of vda2 after the test"
recheck_from_disk /dev/vda2 check_md5s
unload_module
[ "${writes_seen:-0}" -gt 0 ] ||
	fail "status reported writes_seen=${writes_seen:-<missing>} after writes to vda2 while attached: the filter did not see (or count) them"
echo ok
