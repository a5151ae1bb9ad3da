"""Response actions on the host: processes, files, and the network (nftables).

:class:`Responder` turns a controller ``Command`` into a ``CommandResult``; the pieces
(:class:`ProcessActions`, :class:`FileActions`, :class:`Firewall`) are usable on their own,
for example by the local policy enforcer and by ``edr-sensor unisolate --local``.
"""

from sensor.response.errors import ActionFailed, ActionRefused
from sensor.response.netfilter import Firewall
from sensor.response.process import ProcessActions
from sensor.response.quarantine import DEFAULT_ALLOWED_ROOTS, FileActions
from sensor.response.responder import ACTIONS, Responder

__all__ = [
    "ACTIONS",
    "DEFAULT_ALLOWED_ROOTS",
    "ActionFailed",
    "ActionRefused",
    "FileActions",
    "Firewall",
    "ProcessActions",
    "Responder",
]
