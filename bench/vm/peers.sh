#!/bin/sh
# In the guest: blkmig and its peers move the same mounted ext4 from /dev/vda to /dev/vdb (both
# held to a known rate by bench/peers-vm.sh) under the same live workload, one after the other:
#   base     the workload alone, no migration, for BASE_SECS: the reference
#   blkmig   ext4 on vda; `migrate start /dev/vda /dev/vdb --max-pause 1s` to the switch
#            (blkmig-100ms: the same at the default budget, 100 ms; blkmig-noyield: with
#            --busy-queue-depth 8, all 8 copies running under the workload too)
#   pvmove   ext4 on an LV of a VG on vda, vdb in the VG from the start; `pvmove -i 1 vda vdb`
#   clone    ext4 on a dm-linear device over vda; its table swapped to dm-clone (metadata on
#            vdc, 4 KiB regions, hydration in 1 MiB batches, 8 MiB in flight: blkmig's defaults),
#            hydrated, then swapped to dm-linear over vdb
#   md       ext4 on a one-disk md RAID1 of vda, vdb its spare from the start;
#            `mdadm --replace vda --with vdb` until the rebuild ends (resync speed_limit_min
#            raised to speed_limit_max: see below)
#   dd       unmounted, `dd bs=4M` direct: the floor for time, no workload
# The workload, on the mounted filesystem: `stampwriter write` rewriting random 4 KiB blocks of a
# 16 MiB file with O_DIRECT at WRITE_RATE writes/s on a fixed schedule, and a reader taking 1 MiB
# with O_DIRECT from a 32 MiB file every 0.25 s. The filesystem is FILL_PCT percent full of random
# data. After each run the writer's blocks are verified and the filesystem checked on the new
# device. One line per run:
#   BLKMIG-PEER name=N ms=MIGRATION writes=W wsecs=S p50_us= p99_us= max_us= reads=R busy=J
# busy: the guest's busy jiffies (user, nice, system, irq, softirq of /proc/stat) over the run.
. /tests/lib.sh
export DM_DISABLE_UDEV=1 LVM_SUPPRESS_FD_WARNINGS=1
WRITE_RATE=200
BASE_SECS=20
FILL_PCT=60
SECTORS=$(dev_sectors /dev/vda)
MNT=/mnt/src

now_ms() { echo $(($(cut -d' ' -f1 /proc/uptime | tr -d .) * 10)); }
busy_jiffies() { awk '/^cpu /{print $2 + $3 + $4 + $7 + $8}' /proc/stat; }

# make_fs DEV: ext4 on DEV, mounted on $MNT, FILL_PCT percent full of random data, with the
# reader's file. The data are new for every run: a target that still holds an earlier run's copy
# must not match (blkmig compares before it copies).
make_fs() {
	dd if=/dev/urandom of=/tmp/rand bs=1M count=16 status=none || fail "random data"
	must mkfs.ext4 -q -F "$1"
	must mount -t ext4 "$1" "$MNT"
	fill_mb=$(($(df -k "$MNT" | awk 'NR == 2 {print $2}') * FILL_PCT / 102400))
	i=0
	while [ $((i * 16)) -lt "$fill_mb" ]; do
		dd if=/tmp/rand of="$MNT/fill$i" bs=1M conv=fsync status=none || fail "fill $1"
		i=$((i + 1))
	done
	dd if=/tmp/rand of="$MNT/readme" bs=1M count=16 conv=fsync status=none || fail "reader's file"
	dd if=/tmp/rand of="$MNT/readme" bs=1M count=16 seek=16 conv=fsync status=none || fail "reader's file"
}

reader() {
	n=0
	while [ ! -e /tmp/stop ]; do
		dd if="$MNT/readme" of=/dev/null bs=1M count=1 skip=$((n % 32)) iflag=direct status=none ||
			echo "reader: read failed" >/tmp/reader.err
		n=$((n + 1))
		sleep 0.25
	done
	echo "$n" >/tmp/reads
}

workload_start() {
	# the previous run's output must not pass for this writer's
	rm -f /tmp/stop /tmp/reads /tmp/reader.err /tmp/writer.out
	stampwriter write "$MNT/stamps" /tmp/stamps.log --blocks 4096 --stop /tmp/stop \
		--rate "$WRITE_RATE" --slow-ms 100 >/tmp/writer.out 2>&1 &
	WPID=$!
	wait_until 120 "the writer's first pass" grep -q "blocks stamped" /tmp/writer.out
	reader &
	RPID=$!
	W_B0=$(busy_jiffies)
	W_T0=$(now_ms)
}

# workload_stop NAME: stop the workload, check the writer's blocks, print the run's line.
workload_stop() {
	t1=$(now_ms)
	b1=$(busy_jiffies)
	touch /tmp/stop
	if ! wait "$WPID"; then
		cat /tmp/writer.out
		dmesg | tail -n 30
		fail "$1: the writer failed: $(grep -m1 '^Error' /tmp/writer.out) $(tail -n 1 /tmp/writer.out)"
	fi
	wait "$RPID"
	[ -e /tmp/reader.err ] && fail "$1: $(cat /tmp/reader.err)"
	sed "s/^/$1: /" /tmp/writer.out | grep -v "slow write"
	s=$(grep STAMPWRITER-SUMMARY /tmp/writer.out) || fail "$1: no writer summary"
	stampwriter verify "$MNT/stamps" /tmp/stamps.log >/tmp/verify.out 2>&1 ||
		fail "$1: the writer's blocks are wrong after the migration: $(tail -n 3 /tmp/verify.out)"
	s=${s#STAMPWRITER-SUMMARY }
	echo "BLKMIG-PEER name=$1 ms=$((t1 - W_T0)) ${s%% secs=*} wsecs=${s#* secs=} reads=$(cat /tmp/reads) busy=$((b1 - W_B0))"
}

# done_check DEV: the filesystem, unmounted, is clean on its new device.
done_check() {
	must umount "$MNT"
	e2fsck -fn "$1" >/tmp/fsck.out 2>&1 || fail "e2fsck $1 after the migration: $(tail -n 5 /tmp/fsck.out)"
}

wipe() {
	for d in "$@"; do dd if=/dev/zero of="$d" bs=1M count=4 conv=fsync status=none; done
}

run_base() {
	make_fs /dev/vda
	workload_start
	sleep "$BASE_SECS"
	workload_stop base
	done_check /dev/vda
}

# run_blkmig [NAME OPTION...]: blkmig, with more options for `migrate start` under another name;
# PAUSE: its --max-pause (1s)
run_blkmig() {
	name=${1:-blkmig}
	[ $# -eq 0 ] || shift
	make_fs /dev/vda
	workload_start
	migrate start /dev/vda /dev/vdb --json --max-pause "${PAUSE:-1s}" "$@" >/tmp/blkmig.json || fail "migrate start failed"
	workload_stop "$name"
	echo "$name: $(tail -n 1 /tmp/blkmig.json)"
	expect_mode /dev/vda redirect >/dev/null
	must umount "$MNT"
	must migrate detach /dev/vda
	e2fsck -fn /dev/vdb >/tmp/fsck.out 2>&1 || fail "e2fsck /dev/vdb after blkmig: $(tail -n 5 /tmp/fsck.out)"
}

run_pvmove() {
	wipe /dev/vda /dev/vdb
	must lvm pvcreate -q -y /dev/vda /dev/vdb
	must lvm vgcreate -q vg /dev/vda /dev/vdb
	must lvm lvcreate -q -y -Wn -Zn -n lv -l 100%PVS vg /dev/vda
	make_fs /dev/mapper/vg-lv
	workload_start
	lvm pvmove -i 1 /dev/vda /dev/vdb >/tmp/pvmove.out 2>&1 || fail "pvmove failed: $(tail -n 3 /tmp/pvmove.out)"
	workload_stop pvmove
	lvm pvs --noheadings -o pv_name,pv_used | grep -q "vdb.*[1-9]" || fail "pvmove: nothing on vdb: $(lvm pvs 2>&1)"
	done_check /dev/mapper/vg-lv
	must lvm vgremove -q -ff -y vg
	must lvm pvremove -q -ff -y /dev/vda /dev/vdb
}

# clone_done: every region of the dm-clone table of "src" is hydrated.
clone_done() {
	# shellcheck disable=SC2046 # one word per field
	set -- $(dmsetup status src)
	[ "$3" = clone ] || fail "dm-clone: the table of src is $3"
	# 0 LEN clone BLOCK USED/TOTAL REGION HYDRATED/TOTAL HYDRATING ...
	[ "${7%/*}" = "${7#*/}" ] && [ "$8" = 0 ]
}

run_clone() {
	wipe /dev/vdc
	must dmsetup create src --table "0 $SECTORS linear /dev/vda 0"
	make_fs /dev/mapper/src
	workload_start
	must dmsetup suspend src
	must dmsetup load src --table "0 $SECTORS clone /dev/vdc /dev/vdb /dev/vda 8 0 4 hydration_batch_size 256 hydration_threshold 2048"
	must dmsetup resume src
	wait_until 900 "dm-clone's hydration" clone_done
	must dmsetup suspend src
	must dmsetup load src --table "0 $SECTORS linear /dev/vdb 0"
	must dmsetup resume src
	workload_stop clone
	done_check /dev/mapper/src
	must dmsetup remove src
}

# md_done: vdb replaced vda (vdb in sync, vda marked faulty or gone) and no recovery runs.
md_done() {
	[ "$(cat /sys/block/md0/md/sync_action)" = idle ] &&
		grep -q in_sync /sys/block/md0/md/dev-vdb/state &&
		! grep -q in_sync /sys/block/md0/md/dev-vda/state 2>/dev/null
}

run_md() {
	wipe /dev/vda /dev/vdb
	mkdir -p /run/mdadm
	must mdadm --create /dev/md0 --run --quiet --level=1 --raid-devices=1 --force --metadata=1.2 \
		--bitmap=none /dev/vda
	must mdadm /dev/md0 --add-spare /dev/vdb
	make_fs /dev/md0
	# By default md holds a rebuild to speed_limit_min (1000 KiB/s) whenever other I/O reaches
	# the members, as the workload's does: the rebuild would take minutes. Raised here so that
	# it may run as fast as the others.
	echo "md: speed_limit_min $(cat /proc/sys/dev/raid/speed_limit_min), speed_limit_max $(cat /proc/sys/dev/raid/speed_limit_max) KiB/s"
	cat /proc/sys/dev/raid/speed_limit_max >/proc/sys/dev/raid/speed_limit_min
	workload_start
	must mdadm /dev/md0 --replace /dev/vda --with /dev/vdb
	wait_until 900 "md's replacement of vda by vdb" md_done
	workload_stop md
	done_check /dev/md0
	must mdadm --stop /dev/md0
	wipe /dev/vda /dev/vdb
}

run_dd() {
	make_fs /dev/vda
	must umount "$MNT"
	b0=$(busy_jiffies)
	t0=$(now_ms)
	dd if=/dev/vda of=/dev/vdb bs=4M iflag=direct oflag=direct conv=fsync status=none || fail "dd failed"
	t1=$(now_ms)
	echo "BLKMIG-PEER name=dd ms=$((t1 - t0)) writes=0 wsecs=0 p50_us=0 p99_us=0 max_us=0 reads=0 busy=$(($(busy_jiffies) - b0))"
	e2fsck -fn /dev/vdb >/tmp/fsck.out 2>&1 || fail "e2fsck /dev/vdb after dd: $(tail -n 5 /tmp/fsck.out)"
}

mkdir -p /run/lvm /run/lock/lvm /run/mdadm
load_module
# blkmig with two copies in flight instead of 8: a shorter queue at the disks for the workload
run_blkmig_qd2() { run_blkmig blkmig-qd2 --queue-depth 2; }
# blkmig at the default budget, 100 ms
run_blkmig_100ms() { PAUSE=100ms run_blkmig blkmig-100ms; }
# blkmig keeping all 8 copies running under the workload too (it yields to none)
run_blkmig_noyield() { run_blkmig blkmig-noyield --busy-queue-depth 8; }

# /etc/bench-peers: METHODS, the runs to make (bench/peers-vm.sh writes it)
METHODS="base blkmig blkmig_100ms blkmig_noyield blkmig_qd2 pvmove clone md dd"
[ -f /etc/bench-peers ] && . /etc/bench-peers
# after a run that failed: stop the workload, take down what the run set up
clean_up() {
	touch /tmp/stop
	sleep 1
	umount "$MNT" 2>/dev/null
	migrate detach /dev/vda >/dev/null 2>&1
	lvm vgremove -q -ff -y vg >/dev/null 2>&1
	lvm pvremove -q -ff -y /dev/vda /dev/vdb >/dev/null 2>&1
	dmsetup remove src 2>/dev/null
	mdadm --stop /dev/md0 >/dev/null 2>&1
	wipe /dev/vda /dev/vdb
}

# A run that fails is reported (BLKMIG-PEER-FAILED) and the others still run.
for m in $METHODS; do
	step "$m"
	if ! ("run_$m"); then
		echo "BLKMIG-PEER-FAILED name=$m $(cat "$BLKMIG_FAIL_FILE" 2>/dev/null)"
		rm -f "$BLKMIG_FAIL_FILE"
		clean_up
	fi
	wipe /dev/vdb
done
