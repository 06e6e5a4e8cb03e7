#!/bin/sh
# rebalance-plan: `migrate rebalance` runs a plan of three live migrations, two at once, each
# source a mounted ext4 with its own stampwriter: vda -> vdb, vdc -> a dm target over vdd that
# starts failing every I/O in the middle of its copy, vde -> vdf. The two good ones switch, the
# failed one is abandoned (blkmig detached) and the JSON report names it with the target's
# failure; exit status 1. The failed source's application never sees an error, and its
# filesystem is fsck-clean with every stamp. The same plan run again skips the two that switched
# (blkmig in REDIRECT) and reports it; run once more after they are detached, it skips them from
# what the disks say (retired sources), and once more after vda is unplugged, from its state
# directory and its target's head. The switched targets hold the filesystems with every last
# stamp.
# disks: 96M 96M 96M 96M 96M 96M
# needs: module migrate
# timeout: 600
. /tests/lib.sh
. /tests/live-lib.sh
export DM_DISABLE_UDEV=1

live_prepare
tsz=$(dev_sectors /dev/vdd)
must dmsetup create bad --table "0 $tsz linear /dev/vdd 0"
[ -b /dev/mapper/bad ] || fail "dmsetup made no /dev/mapper/bad"

for d in vda vdc vde; do
	step "ext4 on /dev/$d, a writer on it"
	must mkfs.ext4 -q -F /dev/$d
	mkdir -p /mnt/$d
	must mount -t ext4 /dev/$d /mnt/$d
	rm -f /tmp/$d.stop
	stampwriter write /mnt/$d/stamp.dat /tmp/$d.log --blocks 2048 --stop /tmp/$d.stop \
		--gap-us 500 --seed ${#d} >/tmp/$d.out 2>&1 &
	eval "pid_$d=\$!"
done
wait_until 180 "the writers stamped their blocks" sh -c \
	'grep -q "blocks stamped" /tmp/vda.out && grep -q "blocks stamped" /tmp/vdc.out && grep -q "blocks stamped" /tmp/vde.out'

writer_alive() {
	eval "_p=\$pid_$1"
	kill -0 "$_p" 2>/dev/null || fail "the writer on /dev/$1 died: $(errtail /tmp/$1.out)"
}

cat >/tmp/plan.json <<'EOF'
{
  "concurrency": 2,
  "options": { "max_pause": "300ms" },
  "migrations": [
    { "source": "/dev/vda", "target": "/dev/vdb" },
    { "source": "/dev/vdc", "target": "/dev/mapper/bad", "options": { "rate_limit": "8M" } },
    { "source": "/dev/vde", "target": "/dev/vdf" }
  ]
}
EOF

step "a bad plan is refused whole: nothing attached"
sed 's/"concurrency": 2/"concurrency": 0/' /tmp/plan.json >/tmp/plan0.json
run_capture migrate rebalance /tmp/plan0.json
expect_eq "$RC" 2 "exit status of a refused plan"
grep -q 'concurrency: must be at least 1' "$ERR" || fail "the refusal does not name concurrency: $(errtail "$ERR")"
for d in vda vdc vde; do expect_no_filter /dev/$d; done

# result_of REPORT SRC: the report's result object for SRC, on one line (it holds no braces
# until its "migration" summary)
result_of() {
	grep -o "\"source\":\"$2\"[^}]*" "$1" | head -n1
}
# expect_result REPORT SRC RESULT
expect_result() {
	_r=$(result_of "$1" "$2")
	echo "  $2: $_r" | cut -c1-400
	case "$_r" in *"\"result\":\"$3\""*) ;; *) fail "$1: $2 should be $3: $_r" ;; esac
}

step "migrate rebalance (two at once); the target of vdc fails in the middle of its copy"
migrate -v rebalance /tmp/plan.json --json -i 2 >/tmp/r1.json 2>/tmp/r1.err &
reb=$!
wait_synced /dev/vdc 16 240
must dmsetup suspend bad
must dmsetup load bad --table "0 $tsz error"
must dmsetup resume bad
wait_until 400 "migrate rebalance to end" sh -c "! kill -0 $reb 2>/dev/null"
wait $reb
rc=$?
grep -v '^migrate \[' /tmp/r1.err | sed 's/^/  rebalance: /' | tail -n 20
expect_eq "$rc" 1 "exit status of a rebalance with a failed migration"
expect_result /tmp/r1.json /dev/vda switched
expect_result /tmp/r1.json /dev/vdc failed
expect_result /tmp/r1.json /dev/vde switched
why=$(result_of /tmp/r1.json /dev/vdc)
case "$why" in *target*) ;; *) fail "the reason of vdc's failure does not name the target: $why" ;; esac
case "$why" in *abandoned*) ;; *) fail "the failed migration of vdc was not abandoned: $why" ;; esac
grep -q '"totals":{"migrations":3,"switched":2,"skipped":0,"failed":1,"cancelled":0' /tmp/r1.json ||
	fail "the report's totals: $(grep -o '"totals":{[^}]*}' /tmp/r1.json)"
grep -q '"ok":false' /tmp/r1.json || fail "the report says ok although vdc failed"
expect_mode /dev/vda redirect
expect_mode /dev/vde redirect
expect_no_filter /dev/vdc
for d in vda vdc vde; do writer_alive $d; done

step "the same plan again: the switched ones are skipped, vdc fails again (its target still fails)"
run_capture migrate rebalance /tmp/plan.json --json
cp "$OUT" /tmp/r2.json
expect_eq "$RC" 1 "exit status of the second run"
expect_result /tmp/r2.json /dev/vda skipped
expect_result /tmp/r2.json /dev/vdc failed
expect_result /tmp/r2.json /dev/vde skipped
grep -q '"totals":{"migrations":3,"switched":0,"skipped":2,"failed":1' /tmp/r2.json ||
	fail "the second report's totals: $(grep -o '"totals":{[^}]*}' /tmp/r2.json)"
case "$(result_of /tmp/r2.json /dev/vda)" in *"already switched"*) ;; *) fail "vda's skip gives no reason" ;; esac
expect_mode /dev/vda redirect
expect_mode /dev/vde redirect
expect_no_filter /dev/vdc
for d in vda vdc vde; do writer_alive $d; done

step "the writers keep writing for 2 s, then stop"
sleep 2
for d in vda vdc vde; do
	writer_alive $d
	touch /tmp/$d.stop
	eval "_p=\$pid_$d"
	wait "$_p" || fail "the writer on /dev/$d failed: $(errtail /tmp/$d.out)"
done

step "the failed source is intact: no marker, fsck-clean, every stamp"
must umount /mnt/vdc
dd if=/dev/vdc bs=4096 count=1 iflag=direct 2>/dev/null | head -c 16 | grep -qa 'BLKMIG-RETIRED' &&
	fail "the failed source vdc carries the retire marker"
fsck_clean /dev/vdc
drop_caches
must mount -t ext4 /dev/vdc /mnt/vdc
stampwriter verify /mnt/vdc/stamp.dat /tmp/vdc.log >/tmp/v.out 2>&1 || fail "stamps on vdc: $(errtail /tmp/v.out)"
must umount /mnt/vdc

for p in vda:vdb vde:vdf; do
	s=${p%%:*}
	t=${p#*:}
	step "/dev/$s switched to /dev/$t: umount, detach, the target holds every last stamp"
	must umount /mnt/$s
	must migrate detach /dev/$s
	expect_no_filter /dev/$s
	dd if=/dev/$s bs=4096 count=1 iflag=direct 2>/dev/null | head -c 16 | grep -qa 'BLKMIG-RETIRED' ||
		fail "/dev/$s does not carry the retire marker"
	drop_caches
	fsck_clean /dev/$t
	must mount -t ext4 /dev/$t /mnt/tgt
	stampwriter verify /mnt/tgt/stamp.dat /tmp/$s.log >/tmp/v.out 2>&1 || fail "stamps on $t: $(errtail /tmp/v.out)"
	sed 's/^/  /' /tmp/v.out | tail -n 2
	must umount /mnt/tgt
done

step "the plan once more, nothing attached: the retired sources are skipped from what the disks say"
run_capture migrate rebalance /tmp/plan.json
sed 's/^/  /' "$OUT"
expect_eq "$RC" 1 "exit status of the third run (vdc's target still fails)"
grep -q '^/dev/vda -> /dev/vdb: skipped: already switched: /dev/vda is retired' "$OUT" || fail "vda not skipped: $(errtail "$OUT")"
grep -q '^/dev/vde -> /dev/vdf: skipped: already switched: /dev/vde is retired' "$OUT" || fail "vde not skipped: $(errtail "$OUT")"
grep -q '^/dev/vdc -> /dev/mapper/bad: failed: ' "$OUT" || fail "vdc not failed: $(errtail "$OUT")"
grep -q '3 migrations: 0 switched, 2 skipped (switched before), 1 failed' "$OUT" || fail "summary line: $(errtail "$OUT")"
for d in vda vdc vde; do expect_no_filter /dev/$d; done
dd if=/dev/vdc bs=4096 count=1 iflag=direct 2>/dev/null | head -c 16 | grep -qa 'BLKMIG-RETIRED' &&
	fail "the failed source vdc carries the retire marker after the third run"
step "vda unplugged: the plan once more skips it from its state directory and vdb's head"
pci=$(pci_of /dev/vda)
echo 1 >"$pci/remove" || fail "PCI remove of vda failed"
wait_until 10 "vda to disappear" _gone /dev/vda
run_capture migrate rebalance /tmp/plan.json
expect_eq "$RC" 1 "exit status of the fourth run (vdc's target still fails)"
grep -q '^/dev/vda -> /dev/vdb: skipped: already switched: /dev/vda was removed after its switch' "$OUT" ||
	fail "the unplugged vda was not skipped: $(errtail "$OUT")"
grep -q '3 migrations: 0 switched, 2 skipped (switched before), 1 failed' "$OUT" || fail "summary line: $(errtail "$OUT")"
must dmsetup remove bad
unload_module
