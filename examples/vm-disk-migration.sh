#!/usr/bin/env bash
# Move a running VM's disk to another host device with no VM downtime.
#
# The VM (QEMU, libvirt, Firecracker...) has a host block device as its disk,
# for example /dev/vg0/vm1 or /dev/nbd0 or /dev/sdb. blkmig moves the data
# to NEW_DEV underneath the hypervisor: the hypervisor keeps the same
# device open the whole time, and after the switch every guest I/O is
# served by NEW_DEV. At the VM's next restart, point its config at NEW_DEV.
#
#   examples/vm-disk-migration.sh DISK_DEV NEW_DEV [MAX_PAUSE]
#
# MAX_PAUSE (default 50ms) bounds how long guest writes may wait at the
# switch; a guest does not notice tens of milliseconds of write latency.
set -euo pipefail
disk=${1:?usage: vm-disk-migration.sh DISK_DEV NEW_DEV [MAX_PAUSE]}
new=${2:?usage: vm-disk-migration.sh DISK_DEV NEW_DEV [MAX_PAUSE]}
pause=${3:-50ms}
migrate=${MIGRATE:-migrate}

[ -b "$disk" ] || { echo "vm-disk-migration: $disk is not a block device" >&2; exit 2; }
[ -b "$new" ] || { echo "vm-disk-migration: $new is not a block device" >&2; exit 2; }
if [ -r /proc/modules ] && ! grep -q '^blkmig ' /proc/modules; then
	echo "vm-disk-migration: the blkmig module is not loaded" >&2
	exit 2
fi

# Who has the disk open: the hypervisor, which must keep running.
holders=$(fuser -v "$disk" 2>&1 | awk 'NR>1 {print $NF}' | sort -u | tr '\n' ' ' || true)
echo "vm-disk-migration: $disk is in use by: ${holders:-nobody}" >&2

"$migrate" start "$disk" "$new" --max-pause "$pause"
"$migrate" status "$disk" --json
cat >&2 <<MSG
vm-disk-migration: done. Guest I/O to $disk now goes to $new.
At the VM's next restart, give it $new as its disk, then run:
    $migrate detach $disk
MSG
