#!/bin/sh
# crash-in-switch-rollback: crash-in-switch, but the second boot rolls the switch back with
# `migrate recover --rollback`: the source gets its saved head back and holds the filesystem
# (fsck-clean, every acknowledged write); the target stays unrecognisable.
# disks: 160M 160M
# needs: module migrate
# boots: 2
# timeout: 480
RECOVER=rollback
. /tests/scenarios/crash-in-switch.sh
