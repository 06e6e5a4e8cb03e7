#!/bin/sh
# retire-unplug-acpi: retire-unplug with the source unplugged the way an operator unplugs a VM's
# disk: from the host, QEMU's `device_del` through its monitor (ACPI PCI hotplug, sent by
# tests/vm/qmp-unplug.py when the guest asks). The same checks: nothing shut down, no write
# fails, writeback goes on, the last close detaches, the target holds everything.
# disks: 160M 160M
# needs: module migrate
# timeout: 420
# hotplug: qmp
. /tests/lib.sh
. /tests/live-lib.sh

UNPLUG=qmp
unplug_flow
echo "ok: the source was unplugged by the host (ACPI) under a mounted, busy filesystem"
