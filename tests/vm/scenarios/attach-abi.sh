#!/bin/sh
# attach-abi: the filter's ABI refusals, with raw requests (stampwriter abi):
# - the loaded module names its ABI in /sys/module/blkmig/version (`abi<N>`), the one
#   `migrate --version` names (migrate refuses to attach a module of another ABI by it);
# - a filter request on a file opened read-only is refused with EBADF (a filter sees and may
#   change every write: as for BLKDISCARD);
# - a nonzero reserved field (HOLD_WRITES) and an undefined flag (COPY_BEGIN) are refused with
#   EINVAL;
# - a COPY_END prepared under an earlier attachment never commits: region words carry a
#   per-attach generation (with words that restart at zero, the stale word matched and the
#   region was marked in sync with nothing copied);
# - within one attachment, COPY_BEGIN then COPY_END commits.
# disks: 64M 64M
# needs: module migrate
# timeout: 120
. /tests/lib.sh

load_module
_abi=$(migrate --version | sed -n 's/.*module ABI \([0-9]*\).*/\1/p')
expect_eq "$(cat /sys/module/blkmig/version)" "abi$_abi" "the module's version in sysfs vs. migrate --version's ABI"
must migrate attach /dev/vda /dev/vdb
expect_eq "$(stampwriter abi status-read-only /dev/vda)" EBADF "STATUS on a read-only file"
expect_eq "$(stampwriter abi hold-reserved /dev/vda)" EINVAL "HOLD_WRITES with reserved != 0"
expect_eq "$(stampwriter abi copy-reserved /dev/vda)" EINVAL "COPY_BEGIN with an undefined flag"
expect_mode /dev/vda clone
expect_eq "$(status_field /dev/vda writes_held)" 0 "writes held after the refused hold"

step "a COPY_END from an earlier attachment does not commit"
set -- $(stampwriter abi copy-begin /dev/vda 1)
expect_eq "$1" 0 "COPY_BEGIN result"
word=$2
must migrate detach /dev/vda
must migrate attach /dev/vda /dev/vdb
expect_eq "$(stampwriter abi copy-end /dev/vda 1 "$word")" 3 "COPY_END with a word of the earlier attachment (3 = conflict)"
expect_eq "$(status_field /dev/vda regions_synced)" 0 "regions in sync"

step "within one attachment, begin then end commits"
set -- $(stampwriter abi copy-begin /dev/vda 1)
expect_eq "$1" 0 "COPY_BEGIN result"
expect_eq "$(stampwriter abi copy-end /dev/vda 1 "$2")" 0 "COPY_END result (0 = committed)"
expect_eq "$(status_field /dev/vda regions_synced)" 1 "regions in sync"
must migrate detach /dev/vda
unload_module
