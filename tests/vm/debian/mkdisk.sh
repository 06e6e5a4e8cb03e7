#!/usr/bin/env bash
# Make the disk of the root-disk scenario: the Debian 12 root filesystem of rootfs.sh with
# blkmig's three packages installed by dpkg, as an operator would, on partition 1 of a GPT disk.
#
#   tests/vm/debian/mkdisk.sh OUT.img ROOTFS.tar SIZE DEB... [-- FILE:DEST...]
#
# FILE:DEST copies a host file into the image (the scenario's test tools); a unit copied to
# /etc/systemd/system/ is enabled. Prints
#   KERNEL=<path of the packaged kernel, copied out of the image's /boot>
#   APPEND=<the kernel command line that boots the image>
# on stdout. The disk GUID, the partition's PARTUUID and the filesystem's UUID are fixed, and
# mke2fs runs with a fixed time and hash seed, so the same inputs give the same disk. Root is
# mounted by PARTUUID (kernel) and UUID (fstab), with no initramfs: virtio-blk and ext4 are
# built into the kernel.
set -euo pipefail

log() { printf 'debian-mkdisk: %s\n' "$*" >&2; }
die() {
	log "error: $*"
	exit 1
}
[ $# -ge 4 ] || die "usage: $0 OUT.img ROOTFS.tar SIZE DEB... [-- FILE:DEST...]"
out=$1 tarball=$2 size=$3
shift 3
debs=() files=()
while [ $# -gt 0 ] && [ "$1" != -- ]; do
	debs+=("$1")
	shift
done
[ "${1:-}" = -- ] && shift
files=("$@")
[ -f "$tarball" ] || die "no rootfs tarball $tarball"

disk_guid=6c1d3b2e-8e8a-4c55-9d0e-b1a7c0de0001
part_uuid=6c1d3b2e-8e8a-4c55-9d0e-b1a7c0de0101
fs_uuid=6c1d3b2e-8e8a-4c55-9d0e-b1a7c0de1001
export SOURCE_DATE_EPOCH=1735689600 E2FSPROGS_FAKE_TIME=1735689600

work=$(mktemp -d "${TMPDIR:-/var/tmp}/blkmig-debian.XXXXXX")
trap 'rm -rf "$work"' EXIT
root="$work/root"
mkdir "$root"
tar -xf "$tarball" -C "$root"

# The packages, by dpkg in the image, with /proc and /dev as on a running system (the mounts
# live in a namespace of their own and go away with it).
mkdir -p "$root/var/cache/blkmig-debs"
cp "${debs[@]}" "$root/var/cache/blkmig-debs/"
unshare --mount --propagation private sh -euc '
	root=$1
	mount -t proc proc "$root/proc"
	mount --rbind /dev "$root/dev"
	chroot "$root" sh -c "dpkg -i /var/cache/blkmig-debs/*.deb"
' sh "$root" >"$work/dpkg.log" 2>&1 || {
	cat "$work/dpkg.log" >&2
	die "dpkg -i of the packages failed in the image"
}
rm -rf "$root/var/cache/blkmig-debs"

for f in "${files[@]}"; do
	src=${f%%:*} dst=${f#*:}
	install -D -m "$(stat -c %a "$src")" "$src" "$root$dst"
	case "$dst" in /etc/systemd/system/*.service) # enabled, as `systemctl enable` would
		mkdir -p "$root/etc/systemd/system/multi-user.target.wants"
		ln -sf "$dst" "$root/etc/systemd/system/multi-user.target.wants/$(basename "$dst")"
		;;
	esac
done

# The system: the root by UUID, a hostname, a persistent journal; no network, no timers that
# would reach for it.
cat >"$root/etc/fstab" <<FSTAB
UUID=$fs_uuid / ext4 errors=remount-ro 0 1
FSTAB
echo blkmig-guest >"$root/etc/hostname"
mkdir -p "$root/var/log/journal"
for u in apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer e2scrub_reap.service \
	fstrim.timer systemd-timesyncd.service; do
	ln -sf /dev/null "$root/etc/systemd/system/$u"
done
: >"$root/etc/machine-id"

kver=$(ls "$root/lib/modules")
[ "$(echo "$kver" | wc -w)" = 1 ] || die "the image has kernels '$kver', want exactly one"
kernel="$(dirname "$out")/vmlinuz-$kver"
cp "$root/boot/vmlinuz-$kver" "$kernel"

# The filesystem, then the disk: GPT, partition 1 from 1 MiB to 1 MiB short of the end.
bytes=$(numfmt --from=iec "$size")
part_bytes=$((bytes - 2 * 1024 * 1024))
mke2fs -q -t ext4 -d "$root" -U "$fs_uuid" -L root -E "hash_seed=$fs_uuid" -F "$work/fs.img" \
	"$((part_bytes / 1024))k" || die "mke2fs failed"
rm -f "$out"
truncate -s "$bytes" "$out"
sfdisk -q "$out" <<SFDISK || die "sfdisk failed"
label: gpt
label-id: $disk_guid
start=2048, size=$((part_bytes / 512)), type=0FC63DAF-8483-4772-8E79-3D69D8477DE4, uuid=$part_uuid, name=root
SFDISK
dd if="$work/fs.img" of="$out" bs=1M seek=1 conv=notrunc,sparse status=none
echo "KERNEL=$kernel"
echo "APPEND=root=PARTUUID=$part_uuid rootwait ro fsck.mode=force fsck.repair=no"
