#!/bin/sh
# live-hot-region: one block of the writer's file is rewritten continuously (every other write,
# no gap), so its region is nearly always busy or raced during a copy: the copier must leave it
# for the switch window, and the migration must still switch and lose nothing.
# disks: 160M 160M
# needs: module migrate
# timeout: 420
. /tests/lib.sh
. /tests/live-lib.sh

SW_ARGS="--hot 1000 --gap-us 0"
live_migrate_flow /dev/vda /dev/vdb
grep -E 're-copies|busy' "$MIG_LOG" | tail -n1
unload_module
