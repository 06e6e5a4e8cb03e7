#!/bin/sh
# attach-region-limit: 4 KiB regions on a 1 TiB source would need 2^28 region words (2 GiB of
# kernel memory): refused before anything is attached, with E2BIG and a message that names the
# region size that fits; the same source with the default 1 MiB regions attaches (8 MiB of map)
# and detaches cleanly. The disks are sparse files.
# disks: 1T 1T
# needs: module migrate
# timeout: 120
. /tests/lib.sh

load_module
expect_eq "$(dev_sectors /dev/vda)" 2147483648 "size of vda in sectors (1 TiB)"
for cmd in attach start; do
	step "migrate $cmd --region-size 4K on 1 TiB is refused"
	expect_errno E2BIG migrate $cmd /dev/vda /dev/vdb --region-size 4K
	grep -q 'region-size 64.0 KiB\|region-size 65536\|--region-size' "$ERR" ||
		fail "the refusal does not name a region size that fits: $(head -c 300 "$ERR" | tr '\n' ' ')"
	expect_no_filter /dev/vda
done
step "the default region size attaches"
must migrate attach /dev/vda /dev/vdb
expect_mode /dev/vda clone
expect_eq "$(status_field /dev/vda regions_total)" 1048576 "regions of 1 MiB on 1 TiB"
must migrate detach /dev/vda
expect_no_filter /dev/vda
unload_module
