#!/bin/sh
# remote-nbd: a busy, mounted ext4 on vda is live-migrated to a network block device: vdb,
# served by nbd-server on the guest's loopback interface and attached back through the kernel's
# NBD client as /dev/nbd0 (512-byte blocks, 5 s request timeout). It switches, the writer keeps
# writing through the redirect to the remote disk, and after umount and detach the filesystem
# on /dev/nbd0 is fsck-clean with every last stamp; once the client is disconnected and the
# server stopped, vdb itself (what the server wrote) holds the same. The source is retired. The
# pause from `migrate start --json` is printed as BLKMIG-REMOTE-PAUSE.
# disks: 192M 192M
# needs: module migrate
# timeout: 420
. /tests/lib.sh
. /tests/live-lib.sh
. /tests/remote-lib.sh

lo_up
nbd_serve /dev/vdb
nbd_connect
expect_eq "$(dev_sectors /dev/nbd0)" "$(dev_sectors /dev/vdb)" "size of /dev/nbd0 in sectors"

live_begin /dev/vda
live_start /dev/vda /dev/nbd0 --max-pause 200ms --json
live_finish /dev/vda /dev/nbd0
remote_pause nbd

step "disconnect /dev/nbd0, stop the server; the exported disk vdb holds the filesystem"
nbd_server_alive
nbd_disconnect
nbd_server_stop
live_check_target /dev/vdb
unload_module
echo "ok: live migration to NBD in ${MIG_SECS}s, pause ${REMOTE_PAUSE_MS} ms"
