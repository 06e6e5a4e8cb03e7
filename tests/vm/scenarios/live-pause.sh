#!/bin/sh
# live-pause: the switch pause as the application sees it. stampwriter writes with no gap and
# records its longest write; `migrate start` reports the pause it measured (hold -> switch).
# At the default budget (--max-pause 100ms) no write may wait longer than that in a hold (the
# module's measure; live_start checks it): the hold's timer is set within the budget. Prints `BLKMIG-PAUSE writer_ms=.. migrate_ms=..` (the figures in docs/vm-tests.md).
# disks: 160M 160M
# needs: module migrate
# timeout: 420
. /tests/lib.sh
. /tests/live-lib.sh

SW_ARGS="--gap-us 0 --slow-ms 50"
live_migrate_flow /dev/vda /dev/vdb
ok=$(echo "$SW_MAX_MS" | awk '{ print ($1 < 5000) ? "yes" : "no" }')
[ "$ok" = yes ] || fail "the writer's longest write took $SW_MAX_MS ms, not below the 5000 ms hold timeout"
ok=$(echo "$MIG_PAUSE_MS" | awk '{ print ($1 < 5000) ? "yes" : "no" }')
[ "$ok" = yes ] || fail "migrate reports a pause of $MIG_PAUSE_MS ms, not below the 5000 ms hold timeout"
unload_module
echo "ok: writer's longest write $SW_MAX_MS ms, migrate's pause $MIG_PAUSE_MS ms"
