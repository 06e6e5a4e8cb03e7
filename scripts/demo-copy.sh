#!/usr/bin/env bash
# The offline-copy demo (was scripts/demo.sh; the live demo is now scripts/demo.sh), as root on Debian 12.
#
# Today: `migrate copy` of a generated 1 GiB disk image with a filesystem
# and data on it, with the progress bar, checksum verification and sparse
# handling, then a check that the copy mounts and holds the same files.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
scripts/setup-toolchain.sh --user
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
cargo build --release --locked -q -p migrate
migrate="$repo/target/release/migrate"

work=$(mktemp -d /var/tmp/blkmig-demo.XXXXXX)
mnt="$work/mnt"
mkdir -p "$mnt"
cleanup() {
	mountpoint -q "$mnt" && umount "$mnt"
	rm -rf "$work"
}
trap cleanup EXIT

echo "== a 1 GiB source disk image with an ext4 filesystem and 300 MiB of files"
truncate -s 1G "$work/source.img"
mkfs.ext4 -q -L demo "$work/source.img"
mount -o loop "$work/source.img" "$mnt"
for i in $(seq 1 30); do head -c 10M /dev/urandom >"$mnt/file$i"; done
(cd "$mnt" && sha256sum file* >"$work/sums")
umount "$mnt"

echo "== an empty 1 GiB target image"
truncate -s 1G "$work/target.img"

echo "== migrate copy --sparse --verify"
"$migrate" copy "$work/source.img" "$work/target.img" --sparse --verify

echo "== the copy mounts, and every file is identical"
mount -o loop,ro "$work/target.img" "$mnt"
(cd "$mnt" && sha256sum --quiet -c "$work/sums")
umount "$mnt"
echo "demo: OK"
