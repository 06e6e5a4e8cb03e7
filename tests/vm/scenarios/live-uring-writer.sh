#!/bin/sh
# live-uring-writer: the live writer issues its rewrites through io_uring, which tries every write
# with REQ_NOWAIT first. A NOWAIT write must never fail the migration (a mirrored leg that the
# target cannot take without waiting is not a target failure) nor be failed by it: the migration
# converges and switches, and every stamp verifies on the target.
# disks: 192M 192M
# needs: module migrate
# timeout: 420
. /tests/lib.sh
. /tests/live-lib.sh

SW_ARGS="--io uring --gap-us 300"
live_migrate_flow /dev/vda /dev/vdb
unload_module
