#!/bin/bash
# debian-root-disk: the running Debian 12 system's own root disk, moved live, then rebooted onto
# the new disk. The image (tests/vm/debian/) holds blkmig's three packages, installed by dpkg:
# systemd is PID 1, / is vda1 (GPT, root=PARTUUID=, no initramfs), vdb is empty.
# Boot 1: the module was loaded at boot by the package; a workload runs on / (journald lines,
# sqlite rows committed one by one in /var, stampwriter in /var, `apt-get install` of a local
# .deb while the copy runs); `migrate start /dev/vda /dev/vdb` moves the whole disk, partition
# table included, with its progress on the console, and switches; then `systemctl reboot`.
# migrate refuses a state directory on the disk that moves (the saved head must outlive a crash
# inside the switch, when neither disk holds a mountable root): as an operator would, the
# scenario first gives it a small disk of its own (vdc, in /etc/fstab), and checks the refusal.
# Boot 2: / must come up from vdb1 (vda's partition table is retired: the PARTUUID can only
# match vdb), fsck-clean (systemd-fsck-root, forced, read-only), every stamp, row, journal line
# and the apt-installed package as they were, and `migrate status /dev/vda` must report a
# retired disk and where its saved head is.
# image: debian
# disks: 1G 1G 64M
# boots: 2
# needs: image
# timeout: 900
. /tests/lib.sh
. /tests/live-lib.sh
SW_STOP=/run/sw.stop
SW_OUT=/run/sw.out
SW_LOG=/notes/sw.log # outside the disk that moves: what boot 2 checks the stamps against
SW_BLOCKS=2048
DATA=/var/lib/blkmig-test
STOP=/run/workload.stop
PROBE=/root/blkmig-probe_1.0_all.deb
STATE=/srv/blkmig-state

# jsondoc FILE KIND...: FILE's JSON lines against docs/json.md as the blkmig package installed it
jsondoc() {
	_f=$1
	shift
	stampwriter jsondoc /usr/share/doc/blkmig/json.md "$@" <"$_f" >/tmp/jsondoc.out 2>&1 ||
		fail "migrate's JSON ($*) does not match docs/json.md: $(head -c 300 /tmp/jsondoc.out | tr '\n' ' ')"
	echo "  JSON matches docs/json.md ($*)"
}

_cloning() { [ "$(status_mode /dev/vda)" = clone ]; }

# uevent_changes CMD...: runs CMD and prints the block devices that got a "change" uevent
# meanwhile (udev synthesizes one when a device opened for writing is closed: a tool that opens
# disks it has no business writing makes udev probe them again).
uevent_changes() {
	udevadm monitor --kernel --subsystem-match=block >/tmp/uevents 2>&1 &
	_mon=$!
	sleep 1
	"$@" >/dev/null 2>&1
	udevadm settle -t 10
	sleep 1
	kill "$_mon"
	wait "$_mon" 2>/dev/null
	sed -n 's|^KERNEL\[[0-9. ]*\] *change *[^ ]*/\([^/ ]*\) (block)$|\1|p' /tmp/uevents | sort -u | tr '\n' ' '
}

if [ "$BLKMIG_BOOT" = 1 ]; then
	step "boot 1: Debian runs from /dev/vda1, blkmig installed by its packages"
	expect_eq "$(findmnt -no SOURCE /)" /dev/vda1 "the root filesystem's device"
	rel=$(uname -r)
	for p in "linux-image-$rel" "blkmig-module-$rel" blkmig; do
		s=$(dpkg-query -W -f='${Status}' "$p" 2>&1)
		expect_eq "$s" "install ok installed" "dpkg status of $p"
	done
	[ -d /sys/module/blkmig ] || fail "blkmig.ko was not loaded at boot (the module package's modules-load.d)"
	[ "$(modinfo -n blkmig)" = "/lib/modules/$rel/extra/blkmig.ko" ] || fail "modinfo finds blkmig at '$(modinfo -n blkmig 2>&1)'"
	must migrate --version
	for f in /usr/share/man/man1/migrate.1.gz /usr/share/bash-completion/completions/migrate \
		/usr/share/zsh/vendor-completions/_migrate /usr/share/fish/vendor_completions.d/migrate.fish \
		/usr/share/doc/blkmig/json.md; do
		[ -s "$f" ] || fail "the blkmig package did not install $f"
	done

	step "the state directory: refused on the disk that moves, then on a disk of its own (vdc)"
	expect_fail_msg "holds the state directory" migrate start /dev/vda /dev/vdb
	expect_no_filter /dev/vda
	must mkfs.ext4 -q -L blkmig-state /dev/vdc
	echo "LABEL=blkmig-state $STATE ext4 defaults 0 2" >>/etc/fstab
	must mkdir -p "$STATE"
	must mount "$STATE"

	step "the workload on /: journald, sqlite, stampwriter"
	mkdir -p "$DATA"
	must sqlite3 "$DATA/rows.db" 'create table t(id integer primary key, v text not null);'
	rm -f "$STOP"
	(
		i=0
		while [ ! -e "$STOP" ]; do
			i=$((i + 1))
			echo "seq $i"
			echo "$i" >/run/journal.n
			sleep 0.05
		done | systemd-cat -t blkmig-workload
	) &
	jpid=$!
	(
		i=0
		while [ ! -e "$STOP" ]; do
			i=$((i + 1))
			sqlite3 "$DATA/rows.db" "insert into t(id, v) values($i, 'row $i $(date +%s.%N)');" || exit 1
			echo "$i" >/run/rows.n
		done
	) &
	spid=$!
	sw_start "$DATA/stamp.dat"

	step "apt-get installs a local package while the copy runs"
	(
		wait_until 120 "the filter to be attached" _cloning
		apt-get install -y -q "$PROBE" >/run/apt.out 2>&1
		echo $? >/run/apt.rc
		migrate status /dev/vda --json >/run/apt-status.json 2>&1
	) &
	apid=$!

	live_start /dev/vda /dev/vdb --state-dir "$STATE" --rate-limit 16M -i 2
	wait "$apid"
	sed 's/^/  apt: /' /run/apt.out
	expect_eq "$(cat /run/apt.rc)" 0 "apt-get install $PROBE exit status"
	grep -q '"mode":"clone"' /run/apt-status.json ||
		fail "apt-get did not finish while the copy ran (status then: $(head -c 300 /run/apt-status.json))"

	step "after the switch: status, list"
	run_capture migrate status /dev/vda --json
	[ "$RC" -eq 0 ] || fail "migrate status /dev/vda --json failed (exit $RC)"
	grep -q '"mode":"redirect"' "$OUT" || fail "/dev/vda is not in redirect after the switch: $(head -c 300 "$OUT")"
	jsondoc "$OUT" status
	run_capture migrate list --json
	[ "$RC" -eq 0 ] || fail "migrate list --json failed (exit $RC)"
	grep -q '/dev/vda' "$OUT" || fail "migrate list does not show /dev/vda"
	jsondoc "$OUT" list
	# One filter attached (the module's reference count says so): list asks vda, the source
	# with a state record, and opens no other disk for writing.
	expect_eq "$(cat /sys/module/blkmig/refcnt)" 1 "the module's references (one filter attached)"
	_ch=$(uevent_changes migrate list --state-dir "$STATE")
	echo "  devices that got a change uevent during migrate list: ${_ch:-none}"
	for _d in $_ch; do
		case $_d in vda | vda[0-9]*) ;; *) fail "migrate list opened $_d for writing (udev probed it again): only the source has a filter" ;; esac
	done

	step "stop the workload; note what boot 2 must find"
	sleep 2
	touch "$STOP"
	wait "$jpid" "$spid" || fail "a workload writer failed"
	sw_stop
	rows=$(sqlite3 "$DATA/rows.db" 'select count(*) from t;')
	expect_eq "$rows" "$(cat /run/rows.n)" "sqlite rows committed"
	note rows "$rows"
	note journal "$(cat /run/journal.n)"
	note probe "$(dpkg-query -W -f='${Version}' blkmig-probe)"
	echo "  $rows rows, $(noted journal) journal lines, stamps logged in $SW_LOG; rebooting"
	exit 0
fi

step "boot 2: the root came up from the new disk"
expect_eq "$(findmnt -no SOURCE /)" /dev/vdb1 "the root filesystem's device"
[ ! -e /sys/block/vda/vda1 ] || fail "vda still has a partition vda1: its partition table was not retired"
[ -e /sys/block/vdb/vdb1 ] || fail "vdb has no partition vdb1"
blkid -p /dev/vda | grep -q 'PTTYPE' && fail "blkid still finds a partition table on vda: $(blkid -p /dev/vda)"

step "fsck of the moved root (systemd-fsck-root, forced, -n, before / was writable)"
journalctl -b -o cat -u systemd-fsck-root.service | sed 's/^/  /'
expect_eq "$(systemctl show -p Result --value systemd-fsck-root.service)" success "systemd-fsck-root result"
expect_eq "$(systemctl show -p ExecMainStatus --value systemd-fsck-root.service)" 0 "systemd-fsck-root exit status"
journalctl -b -o cat -u systemd-fsck-root.service | grep -q '^Pass 5: ' ||
	fail "systemd-fsck-root did not run e2fsck's full check (no 'Pass 5' in its journal)"

step "what boot 1 wrote: stamps, sqlite rows, journal lines, the apt-installed package"
sw_verify "$DATA/stamp.dat"
expect_eq "$(sqlite3 "$DATA/rows.db" 'pragma integrity_check;')" ok "sqlite integrity_check"
expect_eq "$(sqlite3 "$DATA/rows.db" 'select count(*) from t;')" "$(noted rows)" "sqlite rows"
expect_eq "$(sqlite3 "$DATA/rows.db" 'select max(id) from t;')" "$(noted rows)" "sqlite last row"
journalctl -b -1 -t blkmig-workload -o cat >/tmp/journal.txt
expect_eq "$(grep -c '^seq ' /tmp/journal.txt)" "$(noted journal)" "journal lines of boot 1"
expect_eq "$(tail -n1 /tmp/journal.txt)" "seq $(noted journal)" "boot 1's last journal line"
expect_eq "$(dpkg-query -W -f='${Status} ${Version}' blkmig-probe)" "install ok installed $(noted probe)" "blkmig-probe"
run_capture dpkg --verify blkmig-probe
[ "$RC" -eq 0 ] && [ ! -s "$OUT" ] || fail "dpkg --verify blkmig-probe: files differ from the package"

step "migrate status /dev/vda: a retired disk, and where its saved head is"
expect_eq "$(findmnt -no SOURCE "$STATE")" /dev/vdc "the state directory's disk (from /etc/fstab)"
run_capture migrate status /dev/vda --state-dir "$STATE"
[ "$RC" -eq 0 ] || fail "migrate status /dev/vda failed (exit $RC)"
grep -qi retired "$OUT" || fail "migrate status /dev/vda does not say retired: $(head -c 300 "$OUT")"
head=$STATE/$(devnum /dev/vda)/source-head.bin
grep -qF "$head" "$OUT" || fail "migrate status /dev/vda does not name the saved head $head"
[ "$(stat -c %s "$head")" = 131072 ] || fail "the saved head $head is not 128 KiB"
run_capture migrate status /dev/vda --state-dir "$STATE" --json
jsondoc "$OUT" status-offline
run_capture migrate list --state-dir "$STATE"
grep -E '^/dev/vda +switched +/dev/vdb ' "$OUT" | grep -qF "$head" ||
	fail "migrate list does not show /dev/vda switched to /dev/vdb with its saved head $head"
run_capture migrate list --state-dir "$STATE" --json
jsondoc "$OUT" list
# The module is loaded (at boot, by the package) with no filter attached: list opens no disk for
# writing.
expect_eq "$(cat /sys/module/blkmig/refcnt)" 0 "the module's references (no filter attached)"
_ch=$(uevent_changes migrate list --state-dir "$STATE")
[ -z "$_ch" ] || fail "migrate list opened disks for writing with no filter attached (udev probed them again): $_ch"
echo "ok: migrate list opened no disk for writing"
