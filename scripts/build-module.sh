#!/usr/bin/env bash
# Build kmod/blkmig.ko against the cached test kernel (scripts/build-kernel.sh builds it if
# needed) and print the .ko path on stdout.
#
#   scripts/build-module.sh           build (incremental)
#   scripts/build-module.sh clean     remove the module's build products
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

t0=$(date +%s.%N)
if ! flock "$lock" "${kmake[@]}" -C "$tree" "M=$repo/kmod" "$target" >&2; then
	log "error: module build failed (make -C $tree M=$repo/kmod $target)"
	exit 1
fi
[ "$target" = clean ] && exit 0
ko="$repo/kmod/blkmig.ko"
[ -f "$ko" ] || {
	log "error: $ko was not produced"
	exit 1
}
log "built $ko in $(printf '%.1f' "$(echo "$(date +%s.%N) - $t0" | bc)")s"
echo "$ko"
