#!/bin/sh
# clone-freeze-loop: the source's queue is frozen again and again (nr_requests and, where the
# kernel has mq-deadline, scheduler changes) during a whole live migration, the switch included.
# A held write must never pin the source queue: the migration switches (or fails cleanly), and no
# write waits longer than the hold timeout + 1 s. (With the hook after queue entry, a writer
# parked in the hold kept the queue's usage counter, the freeze waited for it, and the retire
# marker waited for the freeze: every writer of the device hung.)
# disks: 160M 160M
# needs: module migrate
# timeout: 300
. /tests/lib.sh
. /tests/live-lib.sh

live_begin /dev/vda

q=/sys/block/vda/queue
scheds=$(tr -d '[]' <$q/scheduler)
echo "  schedulers: $scheds; nr_requests: $(cat $q/nr_requests)"
rm -f /tmp/freeze.stop
(
	n=0
	while [ ! -e /tmp/freeze.stop ]; do
		echo 32 >$q/nr_requests
		echo 64 >$q/nr_requests
		for s in $scheds; do echo "$s" >$q/scheduler 2>/dev/null; done
		n=$((n + 1))
		echo $n >/tmp/freeze.n
	done
) &
freezer=$!

# --full-copy: the whole device is copied (free space too), so the loop has a copy to freeze under.
# --max-pause 1s: each freeze waits for the I/O in flight, and the switch's own I/O (about 130 ms
# here) does not fit a 200 ms budget's hold, which migrate then says (SwitchOverBudget) rather
# than switch: the point here is the freezes, not the budget.
live_start /dev/vda /dev/vdb --hold-timeout-ms 1000 --max-pause 1s --rate-limit 40M --full-copy
touch /tmp/freeze.stop
wait $freezer
echo "  $(cat /tmp/freeze.n) freeze rounds during the migration"
[ "$(cat /tmp/freeze.n)" -ge 20 ] || fail "the freeze loop ran only $(cat /tmp/freeze.n) rounds (want 20)"
live_finish /dev/vda /dev/vdb
unload_module
ok=$(echo "$SW_MAX_MS" | awk '{ print ($1 <= 2000) ? "yes" : "no" }')
[ "$ok" = yes ] || fail "a write waited $SW_MAX_MS ms: more than the 1000 ms hold timeout + 1 s"
