#!/usr/bin/env python3
"""A disk with a bandwidth, for bench/limit-vm.sh --paced.

Serves one image file over NBD (fixed newstyle, simple replies) on a Unix
socket, one request at a time, and keeps each request busy for
length / RATE seconds like a disk that moves RATE bytes per second: the
disk's time only passes while it serves a request, so idle time is never
banked (unlike QEMU's throttle). Reads and writes share that time.

    paced-nbd.py IMAGE SOCKET RATE_BYTES_PER_SECOND
"""
import os
import socket
import struct
import sys
import threading
import time

NBD_MAGIC = b"NBDMAGIC"
IHAVEOPT = 0x49484156454F5054
REPLY_MAGIC = 0x3E889045565A9
REQ_MAGIC = 0x25609513
SIMPLE_REPLY = 0x67446698
OPT_EXPORT_NAME, OPT_ABORT, OPT_INFO, OPT_GO = 1, 2, 6, 7
REP_ACK, REP_INFO, REP_ERR_UNSUP = 1, 3, (1 << 31) + 1
CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH = 0, 1, 2, 3
# HAS_FLAGS | SEND_FLUSH
TX_FLAGS = 1 | 4
EINVAL = 22


def recv_exact(conn, n):
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = conn.recv_into(view[got:], n - got)
        if k == 0:
            raise EOFError
        got += k
    return buf


class Disk:
    def __init__(self, path, rate):
        self.fd = os.open(path, os.O_RDWR)
        self.size = os.fstat(self.fd).st_size
        self.rate = rate
        self.lock = threading.Lock()
        self.busy_until = 0.0

    def serve_time(self, length):
        """Waits out the time the disk spends on a request of `length` bytes."""
        with self.lock:
            start = max(time.monotonic(), self.busy_until)
            self.busy_until = start + length / self.rate
            end = self.busy_until
        delay = end - time.monotonic()
        if delay > 0:
            time.sleep(delay)


def option_reply(conn, opt, rtype, data=b""):
    conn.sendall(struct.pack(">QIII", REPLY_MAGIC, opt, rtype, len(data)) + data)


def handshake(conn, disk):
    conn.sendall(NBD_MAGIC + struct.pack(">QH", IHAVEOPT, 1 | 2))
    (cflags,) = struct.unpack(">I", recv_exact(conn, 4))
    while True:
        magic, opt, length = struct.unpack(">QII", recv_exact(conn, 16))
        if magic != IHAVEOPT:
            raise EOFError
        recv_exact(conn, length)
        if opt == OPT_EXPORT_NAME:
            tail = b"" if cflags & 2 else bytes(124)
            conn.sendall(struct.pack(">QH", disk.size, TX_FLAGS) + tail)
            return
        if opt in (OPT_INFO, OPT_GO):
            option_reply(conn, opt, REP_INFO, struct.pack(">HQH", 0, disk.size, TX_FLAGS))
            option_reply(conn, opt, REP_ACK)
            if opt == OPT_GO:
                return
        elif opt == OPT_ABORT:
            option_reply(conn, opt, REP_ACK)
            raise EOFError
        else:
            option_reply(conn, opt, REP_ERR_UNSUP)


def serve(conn, disk):
    try:
        handshake(conn, disk)
        while True:
            magic, _flags, cmd, handle, offset, length = struct.unpack(">IHHQQI", recv_exact(conn, 28))
            if magic != REQ_MAGIC:
                return
            err, data = 0, b""
            if cmd == CMD_READ:
                disk.serve_time(length)
                data = os.pread(disk.fd, length, offset)
            elif cmd == CMD_WRITE:
                buf = recv_exact(conn, length)
                disk.serve_time(length)
                os.pwrite(disk.fd, buf, offset)
            elif cmd == CMD_FLUSH:
                os.fsync(disk.fd)
            elif cmd == CMD_DISC:
                return
            else:
                err = EINVAL
            conn.sendall(struct.pack(">IIQ", SIMPLE_REPLY, err, handle) + data)
    except (EOFError, ConnectionError):
        pass
    finally:
        conn.close()


def main():
    path, sock_path, rate = sys.argv[1], sys.argv[2], float(sys.argv[3])
    disk = Disk(path, rate)
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(sock_path)
    srv.listen(4)
    while True:
        conn, _ = srv.accept()
        threading.Thread(target=serve, args=(conn, disk), daemon=True).start()


if __name__ == "__main__":
    main()
