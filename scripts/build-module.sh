#!/usr/bin/env bash
# Build blkmig.ko from kmod/ against the cached test kernel (scripts/build-kernel.sh builds it if
# needed) and print the .ko path on stdout. The build runs in a copy of the sources per kernel
# tree, target/kmod/<tree>/, so that modules for the normal and the debug kernel never share
# objects.
#
#   scripts/build-module.sh           build (incremental)
#   scripts/build-module.sh clean     remove the module's build products
#
# BLKMIG_CLIPPY=1 builds with the kernel's CLIPPY=1 (Debian's clippy-driver of the kernel's rustc)
# in a directory of its own, and fails on any warning.
#
# BLKMIG_KERNEL_TREE=<dir> builds against that tree instead (tests/vm/run.sh passes the tree
# whose bzImage it boots, so that a patch changed meanwhile cannot mix two kernels).
#
# The make runs under flock(/tmp/blkmig-kbuild.lock), like every kernel build.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
lock=/tmp/blkmig-kbuild.lock
: "${BINDGEN:=$repo/target/tools/bin/bindgen}"
kmake=(make LLVM=-19 RUSTC=/usr/bin/rustc HOSTRUSTC=/usr/bin/rustc RUSTDOC=/usr/bin/rustdoc
	"BINDGEN=$BINDGEN")

log() { printf 'build-module: %s\n' "$*" >&2; }

for f in Kbuild blkmig.rs; do
	if [ ! -f "$repo/kmod/$f" ]; then
		log "error: kmod/$f does not exist yet: the module sources are not there"
		exit 1
	fi
done

if [ -n "${BLKMIG_KERNEL_TREE:-}" ]; then
	tree=$BLKMIG_KERNEL_TREE
	[ -f "$tree/.blkmig-built" ] || {
		log "error: $tree is not a finished kernel tree of scripts/build-kernel.sh"
		exit 1
	}
else
	tree=$("$repo/scripts/build-kernel.sh")
fi
target=modules
[ "${1:-}" = clean ] && target=clean

build="$repo/target/kmod/$(basename "$tree")"
clippy=()
if [ "${BLKMIG_CLIPPY:-0}" = 1 ]; then
	build="$build-clippy"
	clippy=(CLIPPY=1 CLIPPY_DRIVER=/usr/bin/clippy-driver)
	[ -x /usr/bin/clippy-driver ] || {
		log "error: /usr/bin/clippy-driver is missing: run scripts/setup-toolchain.sh"
		exit 1
	}
fi
mkdir -p "$build/core/src"
# -p keeps the sources' times, so that make rebuilds only what changed.
cp -p "$repo"/kmod/Kbuild "$repo"/kmod/*.rs "$build/"
cp -p "$repo"/kmod/core/src/*.rs "$build/core/src/"

t0=$(date +%s.%N)
out="$build.log"
if ! flock "$lock" "${kmake[@]}" "${clippy[@]}" -C "$tree" "M=$build" "$target" >"$out" 2>&1; then
	cat "$out" >&2
	log "error: module build failed (make -C $tree M=$build $target)"
	exit 1
fi
cat "$out" >&2
if [ ${#clippy[@]} -gt 0 ] && grep -q '^warning' "$out"; then
	log "error: clippy warnings in the module (see above)"
	exit 1
fi
[ "$target" = clean ] && exit 0
ko="$build/blkmig.ko"
[ -f "$ko" ] || {
	log "error: $ko was not produced"
	exit 1
}
log "built $ko in $(printf '%.1f' "$(echo "$(date +%s.%N) - $t0" | bc)")s"
echo "$ko"
