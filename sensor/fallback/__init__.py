"""The fallback capture tier: no BPF, works unprivileged (for example in CI containers).

Sources, one per family:

* process: :class:`ProcConnectorSource` (netlink proc connector, needs CAP_NET_ADMIN in the
  initial namespaces; sees every process) or :class:`ProcPollSource` (/proc polling, any
  user; misses processes shorter than its interval). :func:`choose_process_source` picks one.
* file: :class:`InotifyFileSource` (inotify on the watch paths; no process context).
* network: :class:`TcpPollSource` (sock_diag, else /proc/net/tcp; misses connections
  shorter than its interval).
"""

from __future__ import annotations

from sensor.capture import Source
from sensor.fallback.file_inotify import InotifyFileSource
from sensor.fallback.net_poll import TcpPollSource
from sensor.fallback.proc_connector import ProcConnectorSource
from sensor.fallback.proc_poll import ProcPollSource

__all__ = [
    "InotifyFileSource",
    "ProcConnectorSource",
    "ProcPollSource",
    "TcpPollSource",
    "choose_process_source",
    "fallback_sources",
]


def choose_process_source() -> tuple[type[Source], str]:
    """The process source for this environment and why it was chosen.

    The proc connector is preferred (it sees every process, with exit codes); when the kernel
    refuses the subscription, /proc polling is used and the reason says what was refused.
    """
    refused = ProcConnectorSource.unavailable()
    if refused is None:
        return ProcConnectorSource, "proc connector subscribed (fork/exec/exit from the kernel)"
    polling = ProcPollSource.unavailable()
    if polling is not None:
        return ProcPollSource, f"{refused}; and {polling}"
    return ProcPollSource, f"{refused}; polling /proc instead (misses short-lived processes)"


def fallback_sources() -> list[tuple[type[Source], str]]:
    """Every fallback source this environment should run, each with the reason it was chosen."""
    proc_cls, why = choose_process_source()
    return [
        (proc_cls, why),
        (InotifyFileSource, "inotify on the watch paths"),
        (TcpPollSource, "sock_diag polling of TCP sockets"),
    ]
