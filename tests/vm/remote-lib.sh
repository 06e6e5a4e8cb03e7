# Helpers for the remote-target VM scenarios (tests/vm/scenarios/remote-*.sh). The guest plays
# both ends: it serves one of its own virtio disks over a network protocol and attaches it
# back as a block device through the kernel's client for that protocol.
# Sourced after lib.sh and live-lib.sh:  . /tests/lib.sh; . /tests/live-lib.sh; . /tests/remote-lib.sh
#
#   lo_up                       the loopback interface, up
#   nbd_serve DISK              nbd-server exporting DISK as "tgt" on 127.0.0.1:$NBD_PORT
#   nbd_connect                 /dev/nbd0 attached to it (512-byte blocks, $NBD_TIMEOUT s timeout)
#   nbd_disconnect              /dev/nbd0 let go (bounded)
#   nbd_server_alive / nbd_server_stop
#   nvme_loop_export DISK       nvmet: subsystem $NVME_NQN, namespace 1 on DISK, a loop port
#   nvme_loop_connect           the host side connected; NVME_NS is its namespace (/dev/nvmeXnY)
#   remote_pause PROTO          the pause of the last `migrate start --json` (MIG_LOG), printed
#                               as a BLKMIG-REMOTE-PAUSE line

NBD_PORT=10809
NBD_DEV=/dev/nbd0
NBD_CONF=/tmp/nbd-server.conf
NBD_LOG=/tmp/nbd-server.log
# Seconds before the kernel client gives up on a request (nbd-client -t). Without it a dead
# server leaves requests waiting for ever: the mirrored writes, and so the application's.
NBD_TIMEOUT=5
NVME_NQN=nqn.2026-11.org.blkmig:remote-target
NVMET=/sys/kernel/config/nvmet

lo_up() {
	must ip link set lo up
	wait_until 10 "lo to come up" _lo_is_up
	echo "  lo: $(ip -4 addr show dev lo | sed -n 's/.*inet \([0-9./]*\).*/\1/p')"
}
_lo_is_up() {
	ip -4 addr show dev lo | grep -q 'inet 127.0.0.1'
}

# --- NBD --------------------------------------------------------------------------------------

# nbd_serve DISK: nbd-server in the background, one process (-d: no daemon, no fork per
# client), so that NBD_SERVER_PID is the whole server. flush and fua: the client then sends
# the target's flushes and FUA writes on to the server, which syncs DISK for them.
nbd_serve() {
	command -v nbd-server >/dev/null || fail "nbd-server is not in the initramfs (scripts/setup-toolchain.sh installs it)"
	cat >"$NBD_CONF" <<EOF
[generic]
	listenaddr = 127.0.0.1
	port = $NBD_PORT
[tgt]
	exportname = $1
	flush = true
	fua = true
EOF
	step "nbd-server: $1 exported as 'tgt' on 127.0.0.1:$NBD_PORT"
	nbd-server -C "$NBD_CONF" -d >"$NBD_LOG" 2>&1 &
	NBD_SERVER_PID=$!
	wait_until 10 "nbd-server to listen on port $NBD_PORT" _nbd_listening
	echo "  nbd-server pid $NBD_SERVER_PID"
}
_nbd_listening() {
	kill -0 "$NBD_SERVER_PID" 2>/dev/null || fail "nbd-server exited: $(errtail "$NBD_LOG")"
	# /proc/net/tcp: local address 127.0.0.1:10809 (0100007F:2A41) in state LISTEN (0A)
	grep -q "0100007F:$(printf %04X "$NBD_PORT") 00000000:0000 0A" /proc/net/tcp
}

# nbd_connect: the kernel client on /dev/nbd0, with the logical block size of the source disks
# (512: blkmig refuses a target whose blocks are larger than the source's) and a request
# timeout, so that a dead server ends in I/O errors rather than in writers waiting for ever
nbd_connect() {
	command -v nbd-client >/dev/null || fail "nbd-client is not in the initramfs (scripts/setup-toolchain.sh installs it)"
	step "nbd-client: $NBD_DEV <- 127.0.0.1:$NBD_PORT 'tgt' (-b 512 -t $NBD_TIMEOUT)"
	run_capture timeout 30 nbd-client 127.0.0.1 "$NBD_PORT" "$NBD_DEV" -N tgt -b 512 -t "$NBD_TIMEOUT"
	[ "$RC" -eq 0 ] || fail "nbd-client failed (exit $RC): $(errtail "$ERR") $(errtail "$OUT")"
	wait_until 10 "$NBD_DEV to have a size" _nbd_sized
	echo "  $NBD_DEV: $(dev_sectors "$NBD_DEV") sectors of $(cat /sys/block/nbd0/queue/logical_block_size) bytes, timeout $(cat /sys/block/nbd0/queue/io_timeout 2>/dev/null) ms"
	[ -d /sys/block/nbd0/mq ] || fail "$NBD_DEV is not a blk-mq device"
}
_nbd_sized() {
	_sz=$(dev_sectors "$NBD_DEV" 2>/dev/null)
	[ "${_sz:-0}" -gt 0 ]
}

# nbd_disconnect: let /dev/nbd0 go (bounded: a dead server must not hang the scenario)
nbd_disconnect() {
	run_capture timeout 20 nbd-client -d "$NBD_DEV"
	[ "$RC" -eq 0 ] || fail "nbd-client -d $NBD_DEV failed (exit $RC): $(errtail "$ERR")"
}

# nbd_server_stop: the server, alive until now, is stopped: run after nbd_disconnect, which
# ends its one connection, and with it the server itself (-d serves one client); SIGTERM if
# it is still there after 10 s
nbd_server_stop() {
	wait_until 10 "nbd-server to exit after the disconnect" _nbd_server_gone
	kill "$NBD_SERVER_PID" 2>/dev/null
	wait "$NBD_SERVER_PID" 2>/dev/null
	echo "  nbd-server exited: $(errtail "$NBD_LOG")"
}
_nbd_server_gone() {
	! kill -0 "$NBD_SERVER_PID" 2>/dev/null
}

# nbd_server_alive: the server is still running
nbd_server_alive() {
	kill -0 "$NBD_SERVER_PID" 2>/dev/null || fail "nbd-server died: $(errtail "$NBD_LOG")"
}

# --- NVMe over Fabrics, loop transport ----------------------------------------------------------

# nvme_loop_export DISK: an nvmet subsystem open to any host, namespace 1 on DISK, and a port
# with the loop transport (configfs)
nvme_loop_export() {
	step "nvmet: subsystem $NVME_NQN, namespace 1 on $1, port 1 (trtype loop)"
	if [ ! -d "$NVMET" ]; then
		grep -q " /sys/kernel/config configfs " /proc/mounts || must mount -t configfs configfs /sys/kernel/config
	fi
	[ -d "$NVMET" ] || fail "no $NVMET (CONFIG_NVME_TARGET)"
	_sub=$NVMET/subsystems/$NVME_NQN
	must mkdir "$_sub"
	must sh -c "echo 1 >$_sub/attr_allow_any_host"
	must mkdir "$_sub/namespaces/1"
	must sh -c "echo -n $1 >$_sub/namespaces/1/device_path"
	must sh -c "echo 1 >$_sub/namespaces/1/enable"
	must mkdir "$NVMET/ports/1"
	must sh -c "echo loop >$NVMET/ports/1/addr_trtype"
	must ln -s "$_sub" "$NVMET/ports/1/subsystems/$NVME_NQN"
}

# nvme_loop_connect: the host side: "transport=loop,nqn=..." written to /dev/nvme-fabrics, which
# answers with the new controller's instance; NVME_CTRL and NVME_NS (/dev/nvmeXnY) name it
nvme_loop_connect() {
	step "connect: transport=loop,nqn=$NVME_NQN"
	[ -c /dev/nvme-fabrics ] || fail "no /dev/nvme-fabrics (CONFIG_NVME_FABRICS)"
	exec 3<>/dev/nvme-fabrics || fail "cannot open /dev/nvme-fabrics"
	echo "transport=loop,nqn=$NVME_NQN" >&3 || {
		exec 3>&-
		fail "the nvme-loop connect was refused: $(dmesg | tail -n 3 | tr '\n' ' ')"
	}
	read -r _answer <&3
	exec 3>&-
	echo "  /dev/nvme-fabrics: $_answer"
	_inst=$(echo "$_answer" | sed -n 's/.*instance=\([0-9]*\).*/\1/p')
	[ -n "$_inst" ] || fail "/dev/nvme-fabrics answered no instance: '$_answer'"
	NVME_CTRL=nvme$_inst
	wait_until 20 "a namespace of $NVME_CTRL" _nvme_ns_found
	NVME_NS=/dev/$NVME_NS_NAME
	wait_until 10 "$NVME_NS to appear" test -b "$NVME_NS"
	echo "  $NVME_CTRL: transport $(cat "/sys/class/nvme/$NVME_CTRL/transport"), namespace $NVME_NS: $(dev_sectors "$NVME_NS") sectors of $(cat "/sys/block/$NVME_NS_NAME/queue/logical_block_size") bytes"
	# A multipath head node (nvmeXcYnZ hidden behind a bio-based nvmeXnZ) would be another
	# device kind; this kernel has no NVMe multipath, so the namespace is the blk-mq disk.
	if [ -e /sys/module/nvme_core/parameters/multipath ]; then
		echo "  nvme_core.multipath=$(cat /sys/module/nvme_core/parameters/multipath)"
	else
		echo "  nvme_core has no multipath (CONFIG_NVME_MULTIPATH off)"
	fi
	[ -d "/sys/block/$NVME_NS_NAME/mq" ] || fail "$NVME_NS is not a blk-mq device"
}
_nvme_ns_found() {
	for _d in /sys/class/nvme/"$NVME_CTRL"/nvme*n*; do
		[ -e "$_d" ] || continue
		NVME_NS_NAME=${_d##*/}
		return 0
	done
	return 1
}

# nvme_loop_disconnect: delete the host's controller
nvme_loop_disconnect() {
	must sh -c "echo 1 >/sys/class/nvme/$NVME_CTRL/delete_controller"
	wait_until 20 "$NVME_NS to go away" test ! -e "$NVME_NS"
}

# --- the pause --------------------------------------------------------------------------------

# remote_pause PROTO: from the summary line of `migrate start --json` in $MIG_LOG ("event":"done"):
# pause_ms (the longest a write was held, as the kernel measured it), switch_window_ms (the
# copier's timing of the window), holds; printed as one BLKMIG-REMOTE-PAUSE line
remote_pause() {
	_done=$(grep '"event":"done"' "$MIG_LOG" | tail -n1)
	[ -n "$_done" ] || fail "migrate start --json printed no summary line: $(errtail "$MIG_LOG")"
	_json_num() { echo "$_done" | sed -n "s/.*\"$1\":\([0-9.e+-]*\).*/\1/p"; }
	REMOTE_PAUSE_MS=$(_json_num pause_ms)
	_win=$(_json_num switch_window_ms)
	_holds=$(_json_num holds)
	[ -n "$REMOTE_PAUSE_MS" ] || fail "the summary has no pause_ms: $_done"
	echo "BLKMIG-REMOTE-PAUSE proto=$1 pause_ms=$REMOTE_PAUSE_MS switch_window_ms=${_win:-?} holds=${_holds:-?} writer_max_ms=${SW_MAX_MS:-?}"
}
