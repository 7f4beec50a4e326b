"""dhtsignal: serverless WebRTC signaling over a hardened Kademlia DHT.

``Peer``, ``Session``, ``ChannelOptions`` and ``DialFailed`` are imported on first use,
so that commands which never touch WebRTC do not pay for importing aiortc.
"""

from __future__ import annotations

from typing import Any

from dhtsignal.errors import DhtSignalError

__version__ = "0.1.0"

_LAZY = {"ChannelOptions", "DialFailed", "Peer", "Session"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from dhtsignal import peer

        return getattr(peer, name)
    raise AttributeError(f"module 'dhtsignal' has no attribute {name!r}")


__all__ = ["ChannelOptions", "DhtSignalError", "DialFailed", "Peer", "Session", "__version__"]
