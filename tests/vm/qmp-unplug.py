#!/usr/bin/env python3
"""Host side of the VM scenarios with "# hotplug: qmp": follows the guest's serial log and, for
each line "BLKMIG-QMP-DEVICE-DEL <id>", asks QEMU (QMP on a unix socket) to unplug device <id>
(ACPI PCI hotplug, as an operator's `device_del` does). Prints what it did on stderr; gives up
after LIMIT seconds.

    qmp-unplug.py SOCKET SERIAL_LOG LIMIT
"""
import json
import re
import socket
import sys
import time


def qmp(sock_path, command, arguments, deadline):
    """Runs one QMP command; returns its reply (a dict with "return" or "error")."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(max(1.0, deadline - time.monotonic()))
    s.connect(sock_path)
    f = s.makefile("rw")

    def reply():
        while True:
            line = f.readline()
            if not line:
                raise ConnectionError("QMP closed the connection")
            msg = json.loads(line)
            if "return" in msg or "error" in msg:
                return msg

    f.readline()  # the greeting
    f.write(json.dumps({"execute": "qmp_capabilities"}) + "\n")
    f.flush()
    reply()
    f.write(json.dumps({"execute": command, "arguments": arguments}) + "\n")
    f.flush()
    r = reply()
    s.close()
    return r


def main():
    sock_path, log_path, limit = sys.argv[1], sys.argv[2], float(sys.argv[3])
    deadline = time.monotonic() + limit
    want = re.compile(r"^BLKMIG-QMP-DEVICE-DEL (\S+)\s*$")
    done = set()
    pos = 0
    while time.monotonic() < deadline:
        try:
            with open(log_path, "rb") as log:
                log.seek(pos)
                data = log.read()
        except FileNotFoundError:
            data = b""
        # Only whole lines; a partial one is read again next time.
        end = data.rfind(b"\n") + 1
        pos += end
        for raw in data[:end].splitlines():
            m = want.match(raw.decode(errors="replace").replace("\r", ""))
            if not m or m.group(1) in done:
                continue
            dev = m.group(1)
            done.add(dev)
            try:
                r = qmp(sock_path, "device_del", {"id": dev}, deadline)
                print(f"qmp-unplug: device_del {dev}: {json.dumps(r)}", file=sys.stderr)
            except (OSError, ValueError, ConnectionError) as e:
                print(f"qmp-unplug: device_del {dev} failed: {e}", file=sys.stderr)
        time.sleep(0.1)


if __name__ == "__main__":
    main()
