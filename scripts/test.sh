#!/usr/bin/env bash
# Run every blkmig test, as root on Debian 12: installs what is missing,
# then unit, property and model-checking tests, the root tier on loop
# devices, the kernel-compatibility check of the protocol core, and the VM
# scenarios (our kernel in QEMU with real virtio disks).
#
#   scripts/test.sh            everything
#   scripts/test.sh --no-vm    everything but the VM scenarios
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
vm=1
[ "${1:-}" = "--no-vm" ] && vm=0

step() { printf '\n== %s\n' "$*" >&2; }

# The debug tier: the scenarios that exercise every path of the hold, the switch and the
# failures, on the debug kernel (see docs/vm-tests.md for its run time).
debug_scenarios="clone-source-errors live-migrate-ext4 live-hot-regions region-hold-timeout live-kill-in-switch clone-freeze-loop clone-polled-io clone-target-fails clone-target-removed attach-rmmod-detach attach-partition crash-in-switch live-two-migrations retire-unplug-two-partitions switch-source-removed"

step "toolchain"
if [ $vm = 1 ]; then scripts/setup-toolchain.sh; else scripts/setup-toolchain.sh --user; fi
# shellcheck source=/dev/null
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"

step "protocol core builds as the kernel builds it (rustc 1.85, edition 2021, no_std)"
if [ -x /usr/bin/rustc ] && /usr/bin/rustc --version | grep -q '^rustc 1\.85\.'; then
	/usr/bin/rustc --edition 2021 --crate-type lib --crate-name blkmig_core -D warnings \
		--emit=metadata -o "$repo/target/blkmig_core_kernel_check.rmeta" kmod/core/src/lib.rs
	echo "ok: kmod/core compiles with $(/usr/bin/rustc --version)" >&2
else
	echo "Debian's rustc 1.85 (rustc-web) is missing: run scripts/setup-toolchain.sh" >&2
	exit 1
fi

export BLKMIG_ROOT_TESTS=0
if [ "$(id -u)" -eq 0 ]; then BLKMIG_ROOT_TESTS=1; fi

step "unit, integration and property tests (root tier: BLKMIG_ROOT_TESTS=$BLKMIG_ROOT_TESTS)"
cargo test --workspace --release --locked

step "loom model checking of the copy protocol"
RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR="$repo/target/loom" \
	cargo test -p blkmig-core --release --locked --test loom

if [ $vm = 1 ]; then
	step "kernel patch series: checkpatch --strict"
	kdir=$(scripts/build-kernel.sh)
	# checkpatch's SPDX check runs Debian's python3 (python3-ply, python3-git).
	(cd "$kdir" && PATH=/usr/bin:$PATH perl scripts/checkpatch.pl --strict --terse "$repo"/kmod/patches/*.patch)
	echo "ok: $(ls kmod/patches/*.patch | wc -l) patches, no errors, warnings or checks" >&2

	step "module: the kernel's rustfmt settings, and clippy (CLIPPY=1) without warnings"
	rustfmt --check --edition 2021 --config-path "$kdir/.rustfmt.toml" kmod/*.rs
	BLKMIG_KERNEL_TREE=$kdir BLKMIG_CLIPPY=1 scripts/build-module.sh >/dev/null

	step "VM scenarios"
	tests/vm/run.sh

	step "VM scenarios on the debug kernel (lockdep, atomic-sleep checks, KFENCE, debug objects)"
	tests/vm/run.sh --debug $debug_scenarios
fi
