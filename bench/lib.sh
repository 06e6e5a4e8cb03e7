# shellcheck shell=bash
# Shared by the bench/*-vm.sh benchmarks (sourced, with `set -euo pipefail`, from the
# repository's root): build what the guest needs, give the disks a known speed, boot one guest
# under /tmp/blkmig-vm.lock like tests/vm/run.sh, and judge it from the serial log.

# bench_build: the kernel (cached, scripts/build-kernel.sh), blkmig.ko and the static migrate and
# stampwriter. Sets kdir and ko. BLKMIG_BENCH_KO: a blkmig.ko already built against that kernel,
# to skip the module build (which waits for /tmp/blkmig-kbuild.lock while a kernel builds).
bench_build() {
	# shellcheck disable=SC1091 # rustup's, when there is one
	[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
	kdir=$(scripts/build-kernel.sh)
	ko=${BLKMIG_BENCH_KO:-$(BLKMIG_KERNEL_TREE=$kdir scripts/build-module.sh)}
	RUSTFLAGS="-C target-feature=+crt-static" cargo build --release -q --locked \
		--target x86_64-unknown-linux-gnu -p migrate -p blkmig-testtools --bins
}

# bench_workdir: a scratch directory in $work, removed on exit with the NBD servers in $pids.
bench_workdir() {
	work=$(mktemp -d /var/tmp/blkmig-bench.XXXXXX)
	pids=()
	trap bench_cleanup EXIT
}
bench_cleanup() {
	for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
	rm -rf "$work"
}

# bench_initramfs NAME GUEST_SCRIPT [mkinitramfs options...]: $work/initramfs.cpio.gz, the VM
# tests' initramfs with GUEST_SCRIPT as scenario NAME, and whatever the caller put under
# $work/extra.
bench_initramfs() {
	local name=$1 script=$2
	shift 2
	tests/vm/mkinitramfs.sh "$work/initramfs.cpio.gz" --module "$ko" \
		--migrate target/x86_64-unknown-linux-gnu/release/migrate \
		--stampwriter target/x86_64-unknown-linux-gnu/release/stampwriter "$@" >/dev/null
	mkdir -p "$work/extra/tests/scenarios"
	install -m 0755 "$script" "$work/extra/tests/scenarios/$name.sh"
	(cd "$work/extra" && find . | LC_ALL=C sort | cpio -o -H newc --quiet | gzip -1) >>"$work/initramfs.cpio.gz"
}

# bench_disk IMAGE BPS PACED [EXTRA]: appends IMAGE as the next virtio disk to drives[], held to
# BPS bytes/s for reads and for writes: QEMU's throttle (PACED=0), or bench/paced-nbd.py serving it
# over NBD (PACED=1), which spends length / BPS on each request, one at a time. BPS 0: no limit.
# EXTRA is appended to the -drive options as it stands.
bench_disk() {
	local img=$1 bps=$2 paced=$3 extra=${4:-} id
	id=$(basename "$img" .img)
	if [ "$bps" = 0 ]; then
		drives+=(-drive "file=$img,if=none,id=$id,format=raw,cache=writeback${extra:+,$extra}")
	elif [ "$paced" = 1 ]; then
		python3 bench/paced-nbd.py "$img" "$work/$id.sock" "$bps" &
		pids+=($!)
		for _ in $(seq 50); do [ -S "$work/$id.sock" ] && break; sleep 0.1; done
		drives+=(-drive "if=none,id=$id,format=raw,cache=writeback,file.driver=nbd,file.server.type=unix,file.server.path=$work/$id.sock${extra:+,$extra}")
	else
		drives+=(-drive "file=$img,if=none,id=$id,format=raw,cache=writeback,throttling.bps-read=$bps,throttling.bps-write=$bps${extra:+,$extra}")
	fi
	drives+=(-device "virtio-blk-pci,drive=$id")
}

# bench_boot NAME TIMEOUT: boots the guest on drives[] to run scenario NAME, one guest at a
# time on this machine (the wait for /tmp/blkmig-vm.lock is bounded). The serial log goes to
# $work/console.log and target/bench-NAME-console.log; fails unless the guest passed.
bench_boot() {
	local name=$1 limit=$2 log="target/bench-$1-console.log"
	mkdir -p target
	exec 9>/tmp/blkmig-vm.lock
	flock -w 1800 9 || {
		echo "bench: /tmp/blkmig-vm.lock still held after 30 minutes" >&2
		exit 1
	}
	timeout -k 5 $((limit + 60)) qemu-system-x86_64 -accel tcg -smp 2,sockets=2 -m 512M -nographic -no-reboot \
		-kernel "$kdir/arch/x86/boot/bzImage" -initrd "$work/initramfs.cpio.gz" \
		-append "console=ttyS0 quiet panic=-1 blkmig.scenario=$name blkmig.timeout=$limit" \
		"${drives[@]}" \
		</dev/null >"$work/console.log" 2>&1 || true
	exec 9>&-
	cp "$work/console.log" "$log"
	grep -q "BLKMIG-VM-RESULT: PASS $name" "$work/console.log" || {
		echo "bench: the guest run failed; see $log" >&2
		exit 1
	}
}
