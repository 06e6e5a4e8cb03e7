#!/bin/sh
# live-region-sizes: the live ext4 migration works at the region-size extremes the copier is
# likely to meet: 64 KiB (vda -> vdb, 2048+ regions: many ioctls, many conflicts) and 4 MiB
# (vdc -> vdd: the writer's file spans few, always-busy regions). Same checks as
# live-migrate-ext4 for each, including the size of the saved head (its first 128 KiB, over 2 regions of 64K).
# disks: 128M 128M 128M 128M
# needs: module migrate
# timeout: 600
. /tests/lib.sh
. /tests/live-lib.sh

live_migrate_flow /dev/vda /dev/vdb --region-size 64K --rate-limit 32M
expect_eq "$LIVE_REGION_BYTES" 65536 "region size of the 64K migration"
t64=$MIG_SECS p64=$MIG_PAUSE_MS w64=$SW_MAX_MS
# 4 MiB regions: the writer's 16 MiB file and the ext4 metadata it dirties keep ~8 regions
# (32 MiB) always raced, and they can only be copied in the switch window. With a rate limit,
# or a 200 ms budget at TCG's ~200 MB/s, the estimate never fits and the copier retries forever:
# no rate limit, 500 ms budget.
live_migrate_flow /dev/vdc /dev/vdd --region-size 4M --max-pause 500ms
expect_eq "$LIVE_REGION_BYTES" 4194304 "region size of the 4M migration"
echo "BLKMIG-REGION-SIZES 64K: ${t64}s pause ${p64} ms writer ${w64} ms; 4M: ${MIG_SECS}s pause ${MIG_PAUSE_MS} ms writer ${SW_MAX_MS} ms"
unload_module
