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
    DaemonError,
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
    WrongNetwork,
)

__version__ = "0.1.0"

_LAZY = {"ChannelOptions", "Peer", "PeerConfig", "Session"}


#: What to install for the WebRTC half (``Peer``, ``Session`` and the session commands).
WEBRTC_EXTRA = "dhtsignal[webrtc]"


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        try:
            from dhtsignal import peer
        except ImportError as exc:
            raise ImportError(
                f"dhtsignal.{name} needs WebRTC support (aiortc): pip install '{WEBRTC_EXTRA}'"
                f" ({exc})"
            ) from exc
        return getattr(peer, name)
    raise AttributeError(f"module 'dhtsignal' has no attribute {name!r}")


__all__ = [
    "BindingFailed",
    "ChannelOptions",
    "ConfigError",
    "ConnectFailed",
    "DaemonError",
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
    "WrongNetwork",
    "__version__",
]
