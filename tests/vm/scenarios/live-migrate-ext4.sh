#!/bin/sh
# live-migrate-ext4: a mounted ext4 on vda, rewritten all the time by stampwriter (O_DIRECT 4 KiB
# stamped blocks), is live-migrated to vdb by `migrate start` (1 MiB regions, the default
# 100 ms pause budget, no rate limit: the plain command an operator runs): it switches, the writer keeps writing through the redirect, and after umount and
# detach the target's filesystem is fsck-clean and every block of the writer's file holds its
# last stamp; the source carries the retire marker and its first region is saved.
# disks: 192M 192M
# needs: module migrate
# timeout: 420
. /tests/lib.sh
. /tests/live-lib.sh

live_migrate_flow /dev/vda /dev/vdb
unload_module
echo "ok: live migration of a busy ext4 in ${MIG_SECS}s"
