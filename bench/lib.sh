# shellcheck shell=bash
# Shared by the bench/*-vm.sh scripts: the build, the initramfs with one
# guest script, the disks (plain image files, QEMU-throttled or paced by
# bench/paced-nbd.py) and the guest run under /tmp/blkmig-vm.lock.
# Sourced from the repository's root, under `set -euo pipefail`.
#
# Environment: BLKMIG_BENCH_KO, a blkmig.ko already built against the
# kernel, to skip the module build (which waits for /tmp/blkmig-kbuild.lock
# while a kernel builds).

[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"

# bench_build: sets kdir and ko; builds the static migrate and stampwriter.
bench_build() {
	kdir=$(scripts/build-kernel.sh)
	ko=${BLKMIG_BENCH_KO:-$(BLKMIG_KERNEL_TREE=$kdir scripts/build-module.sh)}
	RUSTFLAGS="-C target-feature=+crt-static" cargo build --release -q --locked \
		--target x86_64-unknown-linux-gnu -p migrate -p blkmig-testtools --bins
}

# bench_workdir: sets work (a fresh directory) and pids (the disk servers);
# both go when the script exits, also on SIGINT or SIGTERM.
bench_workdir() {
	work=$(mktemp -d /var/tmp/blkmig-bench.XXXXXX)
	pids=()
	trap bench_cleanup EXIT
	trap 'exit 1' INT TERM
}
bench_cleanup() {
	for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
	rm -rf "$work"
}

# bench_initramfs NAME SCRIPT [CONF [MKINITRAMFS_OPTION...]]: $work/initramfs.cpio.gz, the VM
# tests' initramfs (with the extra tests/vm/mkinitramfs.sh options, e.g. --tool lvm) with SCRIPT
# as scenario bench-NAME, bench/vm/lib.sh as /tests/bench-lib.sh, CONF (shell assignments) as
# /tests/bench.conf and whatever the caller put under $work/extra.
bench_initramfs() {
	local name=$1 script=$2 conf=${3:-}
	shift $(($# < 3 ? $# : 3))
	tests/vm/mkinitramfs.sh "$work/initramfs.cpio.gz" --module "$ko" \
		--migrate target/x86_64-unknown-linux-gnu/release/migrate \
		--stampwriter target/x86_64-unknown-linux-gnu/release/stampwriter "$@" >/dev/null
	mkdir -p "$work/extra/tests/scenarios"
	install -m 0755 "$script" "$work/extra/tests/scenarios/bench-$name.sh"
	install -m 0644 bench/vm/lib.sh "$work/extra/tests/bench-lib.sh"
	printf '%s\n' "$conf" >"$work/extra/tests/bench.conf"
	(cd "$work/extra" && find . | LC_ALL=C sort | cpio -o -H newc --quiet | gzip -1) >>"$work/initramfs.cpio.gz"
}

# bench_disk NAME HOW [BPS] [EXTRA]: adds $work/NAME.img to the array
# `drives` as a virtio disk. HOW: plain (the file as it is), throttle
# (QEMU's throttling.bps-read/bps-write=BPS) or paced (served over NBD by
# bench/paced-nbd.py at BPS). EXTRA is appended to the -drive options.
bench_disk() {
	local d=$1 how=$2 bps=${3:-} extra=${4:-}
	case $how in
	plain) drives+=(-drive "file=$work/$d.img,if=none,id=$d,format=raw,cache=writeback${extra:+,$extra}") ;;
	throttle) drives+=(-drive "file=$work/$d.img,if=none,id=$d,format=raw,cache=writeback,throttling.bps-read=$bps,throttling.bps-write=$bps${extra:+,$extra}") ;;
	paced)
		python3 bench/paced-nbd.py "$work/$d.img" "$work/$d.sock" "$bps" &
		pids+=($!)
		for _ in $(seq 50); do [ -S "$work/$d.sock" ] && break; sleep 0.1; done
		drives+=(-drive "if=none,id=$d,format=raw,cache=writeback,file.driver=nbd,file.server.type=unix,file.server.path=$work/$d.sock${extra:+,$extra}")
		;;
	*)
		echo "bench_disk: unknown kind $how" >&2
		return 1
		;;
	esac
	drives+=(-device "virtio-blk-pci,drive=$d")
}

# bench_guest NAME LOG [APPEND] [MEMORY] [SECONDS]: boots the guest on $work's
# initramfs and `drives` (one guest at a time on this machine, as
# tests/vm/run.sh; the wait is bounded), gives the scenario SECONDS (default
# 840), copies its console to LOG and fails unless the scenario passed.
bench_guest() {
	local name=$1 log=$2 append=${3:-} mem=${4:-512M} limit=${5:-840}
	mkdir -p "$(dirname "$log")"
	exec 9>/tmp/blkmig-vm.lock
	flock -w 1800 9 || {
		echo "bench: /tmp/blkmig-vm.lock still held after 30 minutes" >&2
		return 1
	}
	timeout -k 5 $((limit + 60)) qemu-system-x86_64 -accel tcg -smp 2,sockets=2 -m "$mem" -nographic -no-reboot \
		-kernel "$kdir/arch/x86/boot/bzImage" -initrd "$work/initramfs.cpio.gz" \
		-append "console=ttyS0 quiet panic=-1 blkmig.scenario=bench-$name blkmig.timeout=$limit${append:+ $append}" \
		"${drives[@]}" \
		</dev/null >"$work/console.log" 2>&1 || true
	exec 9>&-
	cp "$work/console.log" "$log"
	grep -q "BLKMIG-VM-RESULT: PASS bench-$name" "$work/console.log" || {
		echo "bench: the guest run failed; see $log" >&2
		return 1
	}
}
