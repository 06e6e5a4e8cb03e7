#!/usr/bin/env bash
# Run the blkmig VM scenarios: build (cached) kernel, module, static migrate and initramfs, then
# boot one QEMU (TCG) guest per scenario on fresh file-backed virtio disks and judge it from the
# serial log.
#
#   tests/vm/run.sh [scenario...]       default: every tests/vm/scenarios/*.sh
#   tests/vm/run.sh --debug [scenario...]   the same on the debug kernel (lockdep, atomic-sleep
#                                       checks, KFENCE, debug objects; tests/vm/kernel-debug.config)
#   tests/vm/run.sh --list
#
# Environment: BLKMIG_VM_SMP (default 2), BLKMIG_VM_MEM (512M), BLKMIG_VM_KEEP_DISKS=1 (keep the
# disk images of every scenario under target/vm/), BLKMIG_CACHE (kernel cache, see
# scripts/build-kernel.sh).
#
# Output: one line per scenario, then exactly "N passed, M failed" alone on a line; exit status
# non-zero if anything failed. Serial logs: target/vm-logs/<scenario>.log.
set -uo pipefail

repo=$(cd "$(dirname "$0")/../.." && pwd)
vm="$repo/tests/vm"
logs="$repo/target/vm-logs"
export BLKMIG_KERNEL_VARIANT=normal
if [ "${1:-}" = --debug ]; then
	shift
	BLKMIG_KERNEL_VARIANT=debug
	logs="$repo/target/vm-logs-debug"
fi
smp=${BLKMIG_VM_SMP:-2}
mem=${BLKMIG_VM_MEM:-512M}
migrate_bin="$repo/target/x86_64-unknown-linux-gnu/release/migrate"
vm_lock=/tmp/blkmig-vm.lock

say() { printf '%s\n' "$*"; }
log() { printf 'vm: %s\n' "$*" >&2; }
now() { date +%s.%N; }
since() { printf '%.1f' "$(echo "$(now) - $1" | bc)"; }

# header VALUE of "# KEY: VALUE" in a scenario file
header() { sed -n "s/^# $2:[[:space:]]*//p" "$1" | head -n1; }

if [ "${1:-}" = --list ]; then
	for f in "$vm"/scenarios/*.sh; do
		printf '%-20s disks: %-14s needs: %s\n' "$(basename "$f" .sh)" "$(header "$f" disks)" "$(header "$f" needs)"
	done
	exit 0
fi

names=()
if [ $# -gt 0 ]; then
	for n in "$@"; do
		n=$(basename "$n" .sh)
		[ -f "$vm/scenarios/$n.sh" ] || {
			log "no such scenario: $n (see tests/vm/run.sh --list)"
			exit 2
		}
		names+=("$n")
	done
else
	# Scenarios marked "# kernel: debug" need the debug kernel (fault injection): only --debug
	# runs them by default.
	for f in "$vm"/scenarios/*.sh; do
		[ "$(header "$f" kernel)" = debug ] && [ "$BLKMIG_KERNEL_VARIANT" != debug ] && continue
		names+=("$(basename "$f" .sh)")
	done
fi

need_module=0 need_migrate=0 need_image=0
for n in "${names[@]}"; do
	case " $(header "$vm/scenarios/$n.sh" needs) " in *" module "*) need_module=1 ;; esac
	case " $(header "$vm/scenarios/$n.sh" needs) " in *" migrate "*) need_migrate=1 ;; esac
	[ "$(header "$vm/scenarios/$n.sh" image)" = debian ] && need_image=1
done

mkdir -p "$logs" "$repo/target/vm"
timings=()
t_all=$(now)

# --- builds ---------------------------------------------------------------------------------
t=$(now)
kdir_expected=$("$repo/scripts/build-kernel.sh" --print-dir) || exit 1
kstate=built
[ -f "$kdir_expected/.blkmig-built" ] && kstate=cached
if ! kdir=$("$repo/scripts/build-kernel.sh"); then
	log "kernel build failed"
	say "0 passed, ${#names[@]} failed"
	exit 1
fi
timings+=("kernel ($BLKMIG_KERNEL_VARIANT, $kstate): $(since "$t")s")
bzimage="$kdir/arch/x86/boot/bzImage"

module_arg=none module_err=
if [ $need_module = 1 ]; then
	t=$(now)
	if ko=$(BLKMIG_KERNEL_TREE=$kdir "$repo/scripts/build-module.sh" 2>"$logs/build-module.log"); then
		module_arg=$ko
		timings+=("module: $(since "$t")s")
	else
		module_err="module build failed (see $logs/build-module.log)"
		log "$module_err"
		tail -n 20 "$logs/build-module.log" >&2
	fi
fi

migrate_arg=none migrate_err=
if [ $need_migrate = 1 ]; then
	t=$(now)
	if (cd "$repo" && RUSTFLAGS="-C target-feature=+crt-static" cargo build --release \
		--target x86_64-unknown-linux-gnu -p migrate --bins) >"$logs/build-migrate.log" 2>&1 &&
		[ -x "$migrate_bin" ]; then
		migrate_arg=$migrate_bin
		timings+=("migrate (static): $(since "$t")s")
	else
		migrate_err="static migrate build failed (see $logs/build-migrate.log)"
		log "$migrate_err"
		tail -n 20 "$logs/build-migrate.log" >&2
	fi
fi

t=$(now)
work=$(mktemp -d "$repo/target/vm/run.XXXXXX")
trap '[ "${BLKMIG_VM_KEEP_DISKS:-0}" = 1 ] || rm -rf "$work"' EXIT
initrd="$work/initramfs.cpio.gz"
cp "$bzimage" "$work/bzImage" # the cache keeps two trees: do not depend on this one staying
bzimage="$work/bzImage"
if ! "$vm/mkinitramfs.sh" "$initrd" --module "$module_arg" --migrate "$migrate_arg"; then
	log "initramfs build failed"
	say "0 passed, ${#names[@]} failed"
	exit 1
fi
timings+=("initramfs: $(since "$t")s")

# "# image: debian": the scenario boots a Debian 12 system from its first disk instead of the
# initramfs: blkmig's packages (scripts/package.sh) installed by dpkg into the cached Debian root
# filesystem (tests/vm/debian/), the packaged kernel, root=PARTUUID=. One disk per run, copied
# for each such scenario.
image_err=
if [ $need_image = 1 ]; then
	t=$(now)
	if ! image_err=$("$vm/debian/build.sh" "$work/debian" 2>"$logs/build-image.log"); then
		image_err="Debian image build failed (see $logs/build-image.log)"
		log "$image_err"
		tail -n 20 "$logs/build-image.log" >&2
	else
		# shellcheck source=/dev/null
		. "$work/debian/boot.env" # DEBIAN_DISK, DEBIAN_KERNEL, DEBIAN_APPEND
		timings+=("packages and Debian image: $(since "$t")s")
	fi
fi

# --- scenarios ------------------------------------------------------------------------------
# Kernel reports carry the console's timestamp (PRINTK_TIME), which keeps userspace output such
# as e2fsck's "WARNING: Filesystem still has errors" from passing for one; a Rust panic in
# migrate or the tools has none.
oops_re='^\[ *[0-9]+\.[0-9]+\] .*(BUG:|WARNING:|Oops|Call Trace|Kernel panic|general protection fault|kernel BUG at|blocked for more than|INFO: task|possible circular locking|possible recursive locking|inconsistent lock state|KASAN|KFENCE|UBSAN)|panicked at'
passed=0 failed=0
results=()
for n in "${names[@]}"; do
	f="$vm/scenarios/$n.sh"
	needs=" $(header "$f" needs) "
	reason=
	[ "$(header "$f" kernel)" = debug ] && [ "$BLKMIG_KERNEL_VARIANT" != debug ] &&
		reason="needs the debug kernel (tests/vm/run.sh --debug $n)"
	case "$needs" in *" module "*) [ -n "$module_err" ] && reason=${reason:-$module_err} ;; esac
	case "$needs" in *" migrate "*) [ -n "$migrate_err" ] && reason=${reason:-$migrate_err} ;; esac
	image=$(header "$f" image)
	[ -n "$image" ] && [ -n "$image_err" ] && reason=${reason:-$image_err}
	t=$(now)
	logf="$logs/$n.log"
	if [ -z "$reason" ]; then
		limit=$(header "$f" timeout)
		limit=${limit:-300}
		disks=$(header "$f" disks)
		disks=${disks:-256M 256M}
		mkdir -p "$work/$n"
		drives=()
		letter=a
		# A disk is SIZE or SIZE:PROPS, PROPS being virtio-blk-pci device properties
		# (e.g. 256M:logical_block_size=4096,physical_block_size=4096 or 256M:num-queues=2).
		for spec in $disks; do
			size=${spec%%:*}
			props=
			[ "$spec" = "$size" ] || props=",${spec#*:}"
			img="$work/$n/vd$letter.img"
			rm -f "$img"
			if [ -n "$image" ] && [ $letter = a ]; then
				cp --sparse=always "$DEBIAN_DISK" "$img"
			else
				truncate -s "$size" "$img"
			fi
			drives+=(-drive "file=$img,if=none,id=vd$letter,format=raw,cache=writeback,discard=unmap"
				-device "virtio-blk-pci,drive=vd$letter,id=dev-vd$letter$props")
			letter=$(echo "$letter" | tr 'a-y' 'b-z')
		done
		append=$(header "$f" append)
		# "# boots: N": the scenario runs in N boots of the same disks (BLKMIG_BOOT=1..N); a boot
		# before the last ends in a reset (hard_reset) or a reboot, and only the last one
		# reports the result. /notes, a small ext4 disk added after the scenario's, survives.
		boots=$(header "$f" boots)
		boots=${boots:-1}
		if [ "$boots" -gt 1 ]; then
			img="$work/$n/notes.img"
			rm -f "$img"
			truncate -s 32M "$img"
			mkfs.ext4 -q -F "$img" >/dev/null 2>&1
			drives+=(-drive "file=$img,if=none,id=notes,format=raw,cache=writeback"
				-device "virtio-blk-pci,drive=notes,serial=blkmig-notes")
		fi
		# One VM at a time on this machine, also across concurrent run.sh invocations (2 cores:
		# parallel TCG guests only slow each other down and distort the timings).
		exec 9>"$vm_lock"
		if ! flock -n 9; then
			log "$n: waiting for $vm_lock (another VM test is running)"
			flock 9
		fi
		t=$(now)
		: >"$work/$n.log"
		boot=1
		while :; do
			[ "$boots" -gt 1 ] && echo "===== blkmig VM test: boot $boot of $boots =====" >>"$work/$n.log"
			# "# hotplug: qmp": QEMU's monitor on a socket, and a host-side helper that
			# unplugs the devices the guest asks for (BLKMIG-QMP-DEVICE-DEL lines).
			qmp=()
			: >"$work/$n.boot"
			if [ "$(header "$f" hotplug)" = qmp ]; then
				qmp=(-qmp "unix:$work/$n.qmp,server=on,wait=off")
				python3 "$vm/qmp-unplug.py" "$work/$n.qmp" "$work/$n.boot" $((limit + 60)) 2>>"$work/$n.log" &
				qmp_pid=$!
			fi
			boot_args=(-kernel "$bzimage" -initrd "$initrd")
			[ -n "$image" ] && boot_args=(-kernel "$DEBIAN_KERNEL")
			timeout --foreground -k 5 $((limit + 60)) qemu-system-x86_64 -accel tcg -smp "$smp,sockets=$smp" -m "$mem" \
				-nographic -no-reboot "${boot_args[@]}" \
				-append "${image:+$DEBIAN_APPEND }console=ttyS0 panic=-1 blkmig.scenario=$n blkmig.timeout=$limit blkmig.boot=$boot blkmig.boots=$boots blkmig.kernel=$BLKMIG_KERNEL_VARIANT${append:+ $append}" \
				"${qmp[@]}" "${drives[@]}" </dev/null >"$work/$n.boot" 2>&1
			qrc=$?
			if [ ${#qmp[@]} -gt 0 ]; then
				kill "$qmp_pid" 2>/dev/null
				wait "$qmp_pid" 2>/dev/null
			fi
			cat "$work/$n.boot" >>"$work/$n.log"
			[ "$boot" -ge "$boots" ] && break
			# An earlier boot that failed, or timed out, is the scenario's result.
			if grep -q "^BLKMIG-VM-RESULT: FAIL $n " <(tr -d '\r' <"$work/$n.boot") ||
				[ $qrc -eq 124 ] || [ $qrc -eq 137 ] ||
				grep -qE "$oops_re" <(tr -d '\r' <"$work/$n.boot"); then
				break
			fi
			boot=$((boot + 1))
		done
		exec 9>&-
		# Written whole at the end: concurrent runs never interleave inside one log.
		cp "$work/$n.log" "$logf.$$" && mv -f "$logf.$$" "$logf"
		[ "${BLKMIG_VM_KEEP_DISKS:-0}" = 1 ] || rm -rf "${work:?}/$n"
		clean=$(tr -d '\r' <"$work/$n.log")
		oops=$(grep -m1 -E "$oops_re" <<<"$clean")
		if grep -qx "BLKMIG-VM-RESULT: PASS $n" <<<"$clean" && [ -z "$oops" ]; then
			reason=
		elif [ -n "$oops" ]; then
			reason="log: $oops"
		elif r=$(grep -m1 "^BLKMIG-VM-RESULT: FAIL $n " <<<"$clean"); then
			reason=${r#BLKMIG-VM-RESULT: FAIL $n }
		elif [ $qrc -eq 124 ] || [ $qrc -eq 137 ]; then
			reason="no result line: QEMU killed after $((limit + 60))s"
		else
			reason="no result line (QEMU exit $qrc)"
		fi
	else
		echo "not run: $reason" >"$logf.$$" && mv -f "$logf.$$" "$logf"
	fi
	secs=$(since "$t")
	if [ -z "$reason" ]; then
		passed=$((passed + 1))
		line=$(printf 'PASS  %-20s %6ss' "$n" "$secs")
	else
		failed=$((failed + 1))
		line=$(printf 'FAIL  %-20s %6ss  %s  [%s]' "$n" "$secs" "$reason" "${logf#"$repo"/}")
	fi
	say "$line"
done

log "timings: ${timings[*]/%/;} total $(since "$t_all")s"
say "$passed passed, $failed failed"
[ $failed -eq 0 ]
