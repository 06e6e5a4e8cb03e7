#!/bin/sh
# demo: the guest side of scripts/demo.sh (not a run.sh scenario: scripts/demo.sh adds it to the
# initramfs). A mounted ext4 on vda with files on it and a writer rewriting a file all the time
# is live-migrated to vdb with `migrate start /dev/vda /dev/vdb`; then it is checked like
# live-migrate-ext4 (target fsck-clean, every file and every stamp intact, source retired).
# disks: 256M 256M
# needs: module migrate
# timeout: 600
. /tests/lib.sh
. /tests/live-lib.sh

banner() {
	echo
	echo "######## $*"
}

banner "blkmig demo: move a mounted, busy ext4 from /dev/vda to /dev/vdb, live"
live_prepare
step "mkfs.ext4 /dev/vda, mount it on /mnt/src, put 24 MiB of files on it"
must mkfs.ext4 -q -F -L demo /dev/vda
must mount -t ext4 /dev/vda /mnt/src
mkdir -p /mnt/src/files
rm -f /tmp/md5s
for i in 1 2 3 4 5 6 7 8 9 10 11 12; do
	make_file /mnt/src/files/f$i 2048 || fail "writing /mnt/src/files/f$i failed"
done
sed 's|/mnt/src/|/mnt/tgt/|' /tmp/md5s >/tmp/md5s.tgt
df -h /mnt/src | sed 's/^/  /'
SW_BLOCKS=1024
step "start a writer: stampwriter rewrites 4 KiB blocks of a 4 MiB file with O_DIRECT, non-stop"
sw_start /mnt/src/stamp.dat

banner "migrate start /dev/vda /dev/vdb --rate-limit 64M   (the filesystem stays mounted and in use)"
# Rate-limited to 64 MB/s so that the copy lasts a few seconds (progress lines, mirrored
# writes). The writer's 4 MiB file keeps ~5 regions always raced: they are copied in the
# switch window (at full speed), well within the default 100 ms budget.
live_start /dev/vda /dev/vdb --rate-limit 64M -i 0.5
writes=$(status_field /dev/vda writes_mirrored)

banner "switched: /dev/vda is now served by /dev/vdb; the writer keeps going"
live_finish /dev/vda /dev/vdb
step "the files written before the migration, read from /dev/vdb"
must mount -t ext4 -o ro /dev/vdb /mnt/tgt
check_md5s /tmp/md5s.tgt
must umount /mnt/tgt
unload_module

nw=$(sed -n 's/^stampwriter: \([0-9]*\) writes in.*/\1/p' "$SW_OUT")
banner "blkmig demo: SUCCESS"
echo "  migrated:        /dev/vda -> /dev/vdb, 256 MiB, ext4 mounted and written throughout"
echo "  migrate start:   ${MIG_SECS}s; $(grep '^copied' "$MIG_LOG")"
echo "  writer:          ${nw:-?} writes, longest ${SW_MAX_MS} ms (the switch pause as the application saw it)"
echo "  mirrored writes: ${writes:-?} during the copy"
echo "  target /dev/vdb: fsck clean, 12 files and all $SW_BLOCKS stamped blocks intact"
echo "  source /dev/vda: retired (BLKMIG-RETIRED marker), its first region saved in /var/lib/blkmig"
echo
