#!/bin/sh
# remote-nvme-loop: a busy, mounted ext4 on vda is live-migrated to an NVMe over Fabrics
# namespace: nvmet (configured through configfs) exports vdb as namespace 1 of a subsystem on a
# port with the kernel's loop transport, and the host side, connected through /dev/nvme-fabrics,
# sees it as /dev/nvmeXnY (a blk-mq disk: no multipath head). It switches, the writer keeps
# writing through the redirect, and after umount and detach the filesystem on the namespace is
# fsck-clean with every last stamp; once the controller is deleted, vdb itself holds the same.
# The source is retired. The pause from `migrate start --json` is printed as BLKMIG-REMOTE-PAUSE.
# disks: 192M 192M
# needs: module migrate
# timeout: 420
. /tests/lib.sh
. /tests/live-lib.sh
. /tests/remote-lib.sh

nvme_loop_export /dev/vdb
nvme_loop_connect
expect_eq "$(dev_sectors "$NVME_NS")" "$(dev_sectors /dev/vdb)" "size of $NVME_NS in sectors"

live_begin /dev/vda
live_start /dev/vda "$NVME_NS" --max-pause 200ms --json
live_finish /dev/vda "$NVME_NS"
remote_pause nvme-loop

step "delete the controller; the exported disk vdb holds the filesystem"
nvme_loop_disconnect
live_check_target /dev/vdb
unload_module
echo "ok: live migration to NVMe-oF (loop) in ${MIG_SECS}s, pause ${REMOTE_PAUSE_MS} ms"
