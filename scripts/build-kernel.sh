#!/usr/bin/env bash
# Build the blkmig test kernel (Linux 6.12 + kmod/patches/*.patch + kmod/kernel.config +
# tests/vm/kernel-vm.config), cached. BLKMIG_KERNEL_VARIANT=debug adds tests/vm/kernel-debug.config
# (lockdep, atomic-sleep checks, KFENCE, debug objects): the debug tier's kernel, cached apart.
#
#   scripts/build-kernel.sh              build if needed; print the kernel tree path on stdout
#   scripts/build-kernel.sh --print-dir  print the path the tree has (or would have); no build
#   scripts/build-kernel.sh --key        print the full cache key
#   scripts/build-kernel.sh --make ARG.. run make in the built tree with the build's own variables
#                                        (compiler, Rust, bindgen), under the lock; e.g.
#                                        `--make bindeb-pkg` (scripts/package.sh)
#
# The tree lives in ${BLKMIG_CACHE:-/var/cache/blkmig}/kernel-<key16>; the key is the sha256 of
# the linux-source package version, the toolchain versions, every kmod/patches/*.patch (sorted
# by name), the config fragments and the recipe version below. The bzImage is <tree>/arch/x86/boot/bzImage.
# A tree is used only if its stamp file exists (written last, after every step succeeded); a
# half-built tree is thrown away and rebuilt. The two most recently used trees are kept.
# Every step runs under flock(/tmp/blkmig-kbuild.lock): never two kernel builds at once.
# Progress goes to stderr, make's output to <cache>/kernel-<key16>.log.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
script="$repo/scripts/$(basename "$0")"
cache=${BLKMIG_CACHE:-/var/cache/blkmig}
lock=/tmp/blkmig-kbuild.lock
src_pkg=linux-source-6.12
tarball=/usr/src/$src_pkg.tar.xz
fragment=${BLKMIG_KERNEL_FRAGMENT:-$repo/kmod/kernel.config} # override only for development
vm_fragment="$repo/tests/vm/kernel-vm.config" # what the VM tests' userspace needs
variant=${BLKMIG_KERNEL_VARIANT:-normal}
case "$variant" in
normal) extra_fragments=() ;;
debug) extra_fragments=("$repo/tests/vm/kernel-debug.config") ;;
host)
	# A host's own configuration (e.g. /boot/config-$(uname -r)) with kmod/host-kernel.config
	# over it, instead of the test kernel's allnoconfig and fragments: scripts/package.sh
	# --host-config. All of the host's modules are built.
	host_config=${BLKMIG_HOST_CONFIG:-}
	if [ -z "$host_config" ] || [ ! -f "$host_config" ]; then
		printf 'build-kernel: error: BLKMIG_KERNEL_VARIANT=host needs BLKMIG_HOST_CONFIG=<a kernel .config> (got "%s")\n' "$host_config" >&2
		exit 1
	fi
	fragment="$repo/kmod/host-kernel.config"
	extra_fragments=()
	;;
*)
	printf 'build-kernel: error: BLKMIG_KERNEL_VARIANT=%s: use normal, debug or host\n' "$variant" >&2
	exit 1
	;;
esac
patch_dir="$repo/kmod/patches"
keep=4 # two variants, the current and the previous tree of each
# Part of the cache key: bump it whenever a change to this script changes what it builds (the
# configuration steps, make's variables or targets); comments and messages need no bump.
recipe=3

: "${BINDGEN:=$repo/target/tools/bin/bindgen}"
kmake=(make LLVM=-19 RUSTC=/usr/bin/rustc HOSTRUSTC=/usr/bin/rustc RUSTDOC=/usr/bin/rustdoc
	"BINDGEN=$BINDGEN")

log() { printf 'build-kernel: %s\n' "$*" >&2; }
die() {
	log "error: $*"
	exit 1
}

[ -f "$fragment" ] || die "$fragment is missing (the kernel config fragment)"
[ -f "$vm_fragment" ] || die "$vm_fragment is missing"
[ -f "$tarball" ] || die "$tarball is missing: run scripts/setup-toolchain.sh"
src_version=$(dpkg-query -W -f='${Version}' "$src_pkg" 2>/dev/null) ||
	die "package $src_pkg is not installed: run scripts/setup-toolchain.sh"

patches=()
if [ -d "$patch_dir" ]; then
	while IFS= read -r -d '' p; do patches+=("$p"); done < <(
		find "$patch_dir" -maxdepth 1 -type f -name '*.patch' -print0 | LC_ALL=C sort -z)
fi

compute_key() {
	{
		printf 'source %s %s\n' "$src_pkg" "$src_version"
		printf 'rustc %s\n' "$(/usr/bin/rustc --version 2>&1)"
		printf 'clang %s\n' "$(clang-19 --version 2>&1 | head -n1)"
		printf 'bindgen %s\n' "$("$BINDGEN" --version 2>&1)"
		for p in "${patches[@]}"; do
			printf 'patch %s %s\n' "$(basename "$p")" "$(sha256sum <"$p" | cut -d' ' -f1)"
		done
		printf 'config %s\n' "$(sha256sum <"$fragment" | cut -d' ' -f1)"
		printf 'vm-config %s\n' "$(sha256sum <"$vm_fragment" | cut -d' ' -f1)"
		for f in "${extra_fragments[@]}"; do
			printf 'extra-config %s %s\n' "$(basename "$f")" "$(sha256sum <"$f" | cut -d' ' -f1)"
		done
		[ "$variant" != host ] || printf 'host-config %s\n' "$(sha256sum <"$host_config" | cut -d' ' -f1)"
		printf 'recipe %s\n' "$recipe"
	} | sha256sum | cut -d' ' -f1
}
key=$(compute_key)
dir="$cache/kernel-${key:0:16}"
logfile="$cache/kernel-${key:0:16}.log"
stamp="$dir/.blkmig-built"

case "${1:-}" in
--print-dir)
	echo "$dir"
	exit 0
	;;
--key)
	echo "$key"
	exit 0
	;;
--make)
	shift
	[ -f "$stamp" ] || die "$dir is not built: run $0 first"
	touch "$stamp"
	exec flock "$lock" "${kmake[@]}" -C "$dir" "$@"
	;;
--locked) ;;
"")
	if [ -f "$stamp" ]; then
		touch "$stamp"
		log "cached: $dir"
		echo "$dir"
		exit 0
	fi
	mkdir -p "$cache"
	log "waiting for $lock"
	exec flock "$lock" "$script" --locked
	;;
*) die "usage: $0 [--print-dir|--key]" ;;
esac

# --- from here on we hold the build lock ---------------------------------------------------
if [ -f "$stamp" ]; then # built by someone else while we waited
	touch "$stamp"
	log "cached: $dir"
	echo "$dir"
	exit 0
fi

t0=$(date +%s)
ts() { echo $(($(date +%s) - t0))s; }
fail() {
	log "error: $* (log: $logfile)"
	[ -f "$logfile" ] && tail -n 40 "$logfile" >&2
	exit 1
}

log "building kernel ${key:0:16} ($variant): $src_pkg $src_version, ${#patches[@]} patch(es), $(basename "$fragment")"
[ -e "$dir" ] && log "removing half-built $dir"
rm -rf "$dir"
mkdir -p "$dir"
: >"$logfile"

log "[$(ts)] unpacking $tarball"
tar -xJf "$tarball" -C "$dir" --strip-components=1 || fail "untar failed"

for p in "${patches[@]}"; do
	log "[$(ts)] applying $(basename "$p")"
	{ echo "=== patch $p"; } >>"$logfile"
	patch -d "$dir" -p1 --forward --batch <"$p" >>"$logfile" 2>&1 || fail "patch $(basename "$p") does not apply"
done

if [ "$variant" = host ]; then
	log "[$(ts)] configuring ($host_config + $(basename "$fragment"), olddefconfig)"
	# Kconfig keeps the last value of a symbol given twice: the fragment's.
	cat "$host_config" "$fragment" >"$dir/.config"
	"${kmake[@]}" -C "$dir" olddefconfig >>"$logfile" 2>&1 || fail "make olddefconfig failed"
	checked=("$fragment")
else
	log "[$(ts)] configuring (allnoconfig + tiny configs + $(basename "$fragment") + $(basename "$vm_fragment"))"
	allconfig="$dir/.blkmig-allconfig"
	{
		cat "$dir/kernel/configs/tiny-base.config"
		grep -v '^CONFIG_KERNEL_XZ=' "$dir/kernel/configs/tiny.config"
		cat "$dir/arch/x86/configs/tiny.config"
		cat "$fragment" "$vm_fragment" "${extra_fragments[@]}"
	} >"$allconfig"
	"${kmake[@]}" -C "$dir" allnoconfig "KCONFIG_ALLCONFIG=$allconfig" >>"$logfile" 2>&1 ||
		fail "make allnoconfig failed"
	checked=("$fragment" "$vm_fragment" "${extra_fragments[@]}")
fi

# Every option of the fragment must have landed in .config (Kconfig silently drops options
# whose dependencies are missing).
missing=()
while IFS= read -r line; do
	case "$line" in
	CONFIG_*=*)
		grep -qxF "$line" "$dir/.config" || missing+=("$line (have: $(grep -E "^(# )?${line%%=*}[= ]" "$dir/.config" || echo absent))")
		;;
	"# CONFIG_"*" is not set")
		opt=${line#\# }
		opt=${opt%% *}
		! grep -q "^$opt=" "$dir/.config" || missing+=("$line (have: $(grep "^$opt=" "$dir/.config"))")
		;;
	esac
done < <(cat "${checked[@]}")
if [ ${#missing[@]} -gt 0 ]; then
	for m in "${missing[@]}"; do log "config option did not land: $m"; done
	if printf '%s\n' "${missing[@]}" | grep -q '^CONFIG_RUST='; then
		"${kmake[@]}" -C "$dir" rustavailable >&2 || true
	fi
	fail "${#missing[@]} option(s) of ${checked[*]} are not in .config"
fi
if [ "${BLKMIG_KERNEL_CONFIGURE_ONLY:-0}" = 1 ]; then
	log "[$(ts)] configured (BLKMIG_KERNEL_CONFIGURE_ONLY=1: no build, no stamp): $dir/.config"
	echo "$dir"
	exit 0
fi

log "[$(ts)] building bzImage with -j$(nproc) (log: $logfile)"
"${kmake[@]}" -C "$dir" -j"$(nproc)" bzImage modules >>"$logfile" 2>&1 || fail "kernel build failed"
[ -f "$dir/arch/x86/boot/bzImage" ] || fail "no bzImage after the build"
[ -f "$dir/Module.symvers" ] || fail "no Module.symvers after the build"

touch "$stamp"
log "[$(ts)] done: $dir/arch/x86/boot/bzImage ($(stat -c %s "$dir/arch/x86/boot/bzImage") bytes)"

# Keep the $keep most recently used trees (by stamp, or directory mtime when half-built).
mapfile -t old < <(
	for d in "$cache"/kernel-????????????????; do
		[ -d "$d" ] || continue
		if [ -f "$d/.blkmig-built" ]; then m=$(stat -c %Y "$d/.blkmig-built"); else m=$(stat -c %Y "$d"); fi
		echo "$m $d"
	done | sort -rn | tail -n +$((keep + 1)) | cut -d' ' -f2-)
for d in "${old[@]}"; do
	[ "$d" = "$dir" ] && continue
	log "pruning old kernel tree $d"
	rm -rf "$d" "$d.log"
done

echo "$dir"
