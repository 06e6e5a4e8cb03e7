#!/bin/sh
# retire-signatures: the retire marker covers what blkid probes at a device's start. For each of
# ext4, xfs, btrfs, an LVM physical volume, md members with metadata 1.1 and 1.2, an MBR and a
# GPT disk, made on vda: blkid -p recognises it; `migrate start /dev/vda /dev/vdb` switches;
# then blkid -p finds nothing on the retired vda and the same signature (type and UUID, or the
# partition table) on vdb. md metadata 1.0 lives at the device's end, which the marker does not
# cover: it is migrated too and what blkid says of the retired source is printed, not asserted
# (docs/design.md, "Never mountable twice").
# disks: 320M 320M
# needs: module migrate
# timeout: 600
. /tests/lib.sh
. /tests/live-lib.sh

for tool in mkfs.xfs mkfs.btrfs lvm mdadm; do
	command -v "$tool" >/dev/null || fail "$tool is not in the initramfs (scripts/setup-toolchain.sh installs it on the host)"
done
LVM_CONF='devices { obtain_device_list_from_udev = 0 } activation { udev_sync = 0 udev_rules = 0 }'
mkdir -p /run/lock/lvm /etc/lvm
load_module

# blank DEV: zeros over its first and last MiB, where every signature here lives
blank() {
	_n=$(dev_sectors "$1")
	must dd if=/dev/zero of="$1" bs=1M count=1 oflag=direct conv=notrunc
	must dd if=/dev/zero of="$1" bs=512 count=2048 seek=$((_n - 2048)) oflag=direct conv=notrunc
}

# probe DEV: blkid -p's TYPE, UUID and PTTYPE of DEV, one line ("" when it finds nothing)
probe() {
	drop_caches
	blkid -p -o export "$1" 2>/dev/null | grep -E '^(TYPE|UUID|PTTYPE|PTUUID)=' | sort | tr '\n' ' '
}

# make_sig KIND: KIND on vda
make_sig() {
	case "$1" in
	ext4) must mkfs.ext4 -q -F /dev/vda ;;
	xfs) must mkfs.xfs -q -f /dev/vda ;;
	btrfs) must mkfs.btrfs -q -f /dev/vda ;;
	lvm-pv) must lvm pvcreate -q -y -ff --config "$LVM_CONF" /dev/vda ;;
	md-1.0 | md-1.1 | md-1.2)
		must mdadm --create /dev/md0 --run --quiet --level=1 --raid-devices=2 \
			--metadata="${1#md-}" --assume-clean /dev/vda missing
		must mdadm --stop /dev/md0
		;;
	mbr) echo 'start=2048, size=65536, type=83' | must sfdisk -q --label dos /dev/vda ;;
	gpt) echo 'start=2048, size=65536' | must sfdisk -q --label gpt /dev/vda ;;
	*) fail "make_sig: $1?" ;;
	esac
	# A partition table makes partition devices appear: the source must have no holder.
	blockdev --rereadpt /dev/vda 2>/dev/null || true
}

for kind in ext4 xfs btrfs lvm-pv md-1.1 md-1.2 md-1.0 mbr gpt; do
	step "$kind on vda, migrated to vdb"
	blank /dev/vda
	blank /dev/vdb
	blockdev --rereadpt /dev/vda 2>/dev/null || true
	make_sig "$kind"
	before=$(probe /dev/vda)
	echo "  blkid -p /dev/vda: $before"
	case "$before" in *TYPE=* | *PTTYPE=*) ;; *) fail "blkid does not recognise the new $kind on vda" ;; esac
	run_capture migrate start /dev/vda /dev/vdb --region-size 4M
	[ "$RC" -eq 0 ] || fail "migrate start of the $kind vda failed (exit $RC): $(errtail "$ERR")"
	expect_mode /dev/vda redirect
	must migrate detach /dev/vda
	after=$(probe /dev/vda)
	target=$(probe /dev/vdb)
	echo "  after the switch: vda: ${after:-nothing}; vdb: $target"
	expect_eq "$target" "$before" "what blkid finds on vdb (the $kind vda had)"
	if [ "$kind" = md-1.0 ]; then
		echo "  md 1.0 keeps its superblock at the end of the retired source: ${after:-(none found)}"
		continue
	fi
	[ -z "$after" ] || fail "blkid still recognises the retired $kind source: $after"
done
unload_module
