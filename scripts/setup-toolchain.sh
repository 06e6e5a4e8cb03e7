#!/usr/bin/env bash
# Install everything blkmig needs on a Debian 12 machine, as root. Idempotent:
# a second run installs nothing and finishes in seconds.
#
#   scripts/setup-toolchain.sh            everything (userspace + kernel + VM)
#   scripts/setup-toolchain.sh --user     only what the userspace crates need
set -euo pipefail

KERNEL_SOURCE_VERSION=6.12.117-1~deb12u1
RUST_WEB_VERSION=1.85.0+dfsg3-1~deb12u3
CLANG=19
BINDGEN_VERSION=0.69.5
CARGO_DEB_VERSION=3.8.0

here=$(cd "$(dirname "$0")/.." && pwd)
tools="$here/target/tools"

log() { printf 'setup: %s\n' "$*" >&2; }

need_user=1 need_kernel=1
[ "${1:-}" = "--user" ] && need_kernel=0

if [ "$(id -u)" -ne 0 ]; then
	log "must run as root (installs Debian packages)"
	exit 1
fi

pkgs=()
if [ $need_user = 1 ]; then
	pkgs+=(e2fsprogs util-linux fdisk coreutils bc)
fi
if [ $need_kernel = 1 ]; then
	pkgs+=(
		"linux-source-6.12=$KERNEL_SOURCE_VERSION"
		"rustc-web=$RUST_WEB_VERSION" "rust-web-src=$RUST_WEB_VERSION"
		"libstd-rust-web-dev=$RUST_WEB_VERSION" "rust-web-clippy=$RUST_WEB_VERSION"
		"clang-$CLANG" "lld-$CLANG" "llvm-$CLANG" "libclang-$CLANG-dev"
		flex bison bc libelf-dev libssl-dev cpio kmod make gcc xz-utils zstd
		qemu-system-x86 busybox-static dmsetup util-linux python3-ply python3-git
		nbd-server nbd-client # the remote-nbd* VM scenarios: server and client in the guest
		lvm2 mdadm # bench/peers-vm.sh: pvmove and mdadm --replace in the guest
		xfsprogs btrfs-progs # retire-signatures (with lvm2 and mdadm): each signature the marker covers
		dpkg-dev debhelper rsync # scripts/package.sh: the kernel's bindeb-pkg, the module's package
		mmdebstrap debian-archive-keyring # tests/vm/debian/: the Debian 12 guest image
	)
fi

missing=()
for p in "${pkgs[@]}"; do
	name=${p%%=*}
	want=${p#*=}
	have=$(dpkg-query -W -f='${Status} ${Version}' "$name" 2>/dev/null || true)
	case "$have" in
	"install ok installed "*)
		[ "$want" = "$p" ] || [ "${have##* }" = "$want" ] || missing+=("$p")
		;;
	*) missing+=("$p") ;;
	esac
done

if [ ${#missing[@]} -gt 0 ]; then
	log "installing: ${missing[*]}"
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -qq
	apt-get install -y -qq --no-install-recommends --allow-downgrades "${missing[@]}" >/dev/null
fi

if [ $need_kernel = 1 ]; then
	if ! "$tools/bin/bindgen" --version 2>/dev/null | grep -q " $BINDGEN_VERSION\$"; then
		log "building bindgen-cli $BINDGEN_VERSION"
		cargo install --quiet --locked --root "$tools" bindgen-cli --version "$BINDGEN_VERSION"
	fi
fi

if ! command -v cargo >/dev/null && [ -f "$HOME/.cargo/env" ]; then
	# shellcheck source=/dev/null
	. "$HOME/.cargo/env"
fi
if ! command -v cargo >/dev/null; then
	log "no cargo found: blkmig's userspace needs a Rust toolchain >= 1.95 (rustup)"
	exit 1
fi

if [ $need_kernel = 1 ]; then
	# scripts/package.sh: the blkmig .deb
	if ! "$tools/bin/cargo-deb" --version 2>/dev/null | grep -q " $CARGO_DEB_VERSION\$"; then
		log "building cargo-deb $CARGO_DEB_VERSION"
		cargo install --quiet --locked --root "$tools" cargo-deb --version "$CARGO_DEB_VERSION"
	fi
fi

if [ $need_user = 1 ]; then
	rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy rustfmt 2>/dev/null || true
fi
log "toolchain ready"
