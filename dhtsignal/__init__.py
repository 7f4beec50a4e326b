"""dhtsignal: serverless WebRTC signaling over a hardened Kademlia DHT.

``Peer``, ``PeerConfig``, ``Session`` and ``ChannelOptions`` are imported on first use, so that
commands which never touch WebRTC do not pay for importing aiortc. Every error type
is exported here (see :mod:`dhtsignal.errors` for the naming rule).
"""

from __future__ import annotations

from typing import Any

from dhtsignal.errors import (
    BindingFailed,
    ConfigError,
    ConnectFailed,
    DependencyChanged,
    DhtSignalError,
    DhtTimeout,
    DialFailed,
    EnvelopeRejected,
    LimitExceeded,
    NodeIdTaken,
    PeerNotFound,
    PinnedKeyChanged,
    ProtocolError,
    PutFailed,
    RecordRejected,
    RemoteError,
    RpcTimeout,
    SessionClosed,
    SessionClosedError,
    SimulationStalled,
    StoreLimitExceeded,
    UsageError,
)

__version__ = "0.1.0"

_LAZY = {"ChannelOptions", "Peer", "PeerConfig", "Session"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from dhtsignal import peer

        return getattr(peer, name)
    raise AttributeError(f"module 'dhtsignal' has no attribute {name!r}")


__all__ = [
    "BindingFailed",
    "ChannelOptions",
    "ConfigError",
    "ConnectFailed",
    "DependencyChanged",
    "DhtSignalError",
    "DhtTimeout",
    "DialFailed",
    "EnvelopeRejected",
    "LimitExceeded",
    "NodeIdTaken",
    "Peer",
    "PeerConfig",
    "PeerNotFound",
    "PinnedKeyChanged",
    "ProtocolError",
    "PutFailed",
    "RecordRejected",
    "RemoteError",
    "RpcTimeout",
    "Session",
    "SessionClosed",
    "SessionClosedError",
    "SimulationStalled",
    "StoreLimitExceeded",
    "UsageError",
    "__version__",
]
