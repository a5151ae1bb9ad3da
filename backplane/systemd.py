"""systemd's service notification protocol (sd_notify), for both daemons.

A datagram to ``$NOTIFY_SOCKET`` tells systemd a ``Type=notify`` unit is ready (``READY=1``),
stopping (``STOPPING=1``) or what it is doing (``STATUS=...``). Outside systemd the variable is
unset and this does nothing. The protocol is a few lines; no library is worth it.
"""

from __future__ import annotations

import os
import socket


def notify(*fields: str) -> bool:
    """Send ``fields`` (e.g. ``"READY=1"``, ``"STATUS=capturing"``); False if not under systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address or not fields:
        return False
    if address.startswith("@"):  # an abstract socket
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall("\n".join(fields).encode())
    except OSError:
        return False
    return True
