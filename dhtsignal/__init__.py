"""dhtsignal: serverless WebRTC signaling over a hardened Kademlia DHT."""

from __future__ import annotations

__version__ = "0.1.0"
