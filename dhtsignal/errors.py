"""Every error type dhtsignal raises on purpose, all exported from :mod:`dhtsignal`.

One base class, :class:`DhtSignalError`. Local misuse (:class:`UsageError`,
:class:`ConfigError`, :class:`LimitExceeded`) and what a remote party sent, did or
failed to do (:class:`RemoteError` and everything below it) are different branches;
timeouts are typed and carry what timed out.

Naming rule: a *branch* (a class meant to be caught for a whole family) ends in
``Error``; a *leaf* is named for what happened, as a past participle or a short
statement (:class:`NodeIdTaken`, :class:`PeerNotFound`, :class:`DialFailed`,
:class:`RecordRejected`, :class:`SessionClosed`), and a timeout ends in ``Timeout``
(:class:`DhtTimeout`, :class:`RpcTimeout`).

A refusal carries a short machine-readable ``reason`` tag where the caller may act on
it (:class:`RecordRejected`, :class:`EnvelopeRejected`, :class:`DialFailed`,
:class:`ConnectFailed`); the message is for people.
"""

from __future__ import annotations

from dhtsignal.wire.addr import Addr, show_addr


class DhtSignalError(Exception):
    """Base class of every error dhtsignal raises on purpose."""


class UsageError(DhtSignalError):
    """The local caller asked for something that cannot be done."""


class ConfigError(UsageError):
    """A configuration setting is invalid. ``setting`` names it."""

    def __init__(self, setting: str, message: str) -> None:
        super().__init__(f"invalid setting {setting!r}: {message}")
        self.setting = setting


class LimitExceeded(UsageError):
    """A local request exceeds a size, count or quota limit."""


class RemoteError(DhtSignalError):
    """Something a remote node sent or did (or failed to do)."""


class ProtocolError(RemoteError):
    """A remote peer sent something that does not follow the protocol."""


class WrongNetwork(RemoteError):
    """A node answered that it serves another network id than ours."""

    def __init__(self, addr: tuple[str, int], network: str, ours: str) -> None:
        host = f"[{addr[0]}]" if ":" in addr[0] else addr[0]
        super().__init__(
            f"{host}:{addr[1]} serves network {network!r}, not {ours!r} "
            "(give both the same --network)"
        )
        self.addr = addr
        self.network = network
        self.ours = ours


class RecordRejected(DhtSignalError):
    """A record failed validation. ``reason`` is a short machine-readable tag."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


class PinnedKeyChanged(RemoteError):
    """A node ID we pinned is now presented with another key.

    ``path`` is the pin file (None: pins kept in memory), ``network`` the network id the
    pin belongs to; the message names both and the way out (``dhtsignal pins forget``).
    """

    def __init__(
        self,
        node_id: str,
        pinned: str,
        seen: str,
        *,
        path: str | None = None,
        network: str | None = None,
        remedy: str | None = None,
    ) -> None:
        where = f" in {path}" if path else ""
        scope = f" (network {network!r})" if network else ""
        way_out = remedy or f"dhtsignal pins forget {node_id}"
        super().__init__(
            f"node id {node_id!r}{scope} is pinned to key {pinned[:16]}…{where} but the DHT "
            f"presents key {seen[:16]}…; refusing. If its owner changed keys on purpose, "
            f"forget the pin: {way_out}"
        )
        self.node_id = node_id
        self.pinned = pinned
        self.seen = seen
        self.path = path
        self.network = network


class NodeIdTaken(RemoteError):
    """Another key holds a live claim on the node ID.

    ``node_id``, the ``holder``'s key (hex) and ``until`` (wall-clock UNIX time the
    holder's claim expires unless refreshed) are set when they are known.
    """

    def __init__(
        self,
        message: str,
        *,
        node_id: str | None = None,
        holder: str | None = None,
        until: float | None = None,
    ) -> None:
        super().__init__(message)
        self.node_id = node_id
        self.holder = holder
        self.until = until


class DaemonError(RemoteError):
    """A running daemon refused or failed a request of its local API (:mod:`dhtsignal.api`).

    ``type_name`` names the daemon's error class (``DialFailed``, ``PeerNotFound``...,
    ``DaemonGone`` when the connection ended), ``reason`` its machine tag or None.
    """

    def __init__(self, type_name: str, reason: str | None, message: str) -> None:
        super().__init__(message)
        self.type_name = type_name
        self.reason = reason


class PeerNotFound(RemoteError):
    """No live presence record exists for the node ID."""


class DhtTimeout(RemoteError):
    """A DHT operation did not complete in time. ``what`` says which."""

    def __init__(self, what: str, seconds: float) -> None:
        super().__init__(f"{what} timed out after {seconds:.1f} s")
        self.what = what
        self.seconds = seconds


class RpcTimeout(DhtTimeout):
    """An RPC got no reply after all its tries. ``addr`` is where it was sent."""

    def __init__(self, name: str, addr: Addr, seconds: float) -> None:
        super().__init__(f"{name} to {show_addr(addr)}", seconds)
        self.addr = addr


class PutFailed(RemoteError):
    """No storing node accepted a record."""


class StoreLimitExceeded(PutFailed):
    """No storing node accepted a record because a storage limit is used up.

    ``limit`` is the storing nodes' refusal reason: ``quota`` (records or bytes per
    source address), ``key-full`` (values per key), ``signer-full`` (slots of one signer
    under one key) or ``store-full`` (a node's total).
    """

    def __init__(self, limit: str, message: str) -> None:
        super().__init__(message)
        self.limit = limit


class EnvelopeRejected(RemoteError):
    """A signaling envelope was refused. ``reason`` is a short machine-readable tag:
    ``malformed``, ``bad-signature``, ``wrong-recipient``, ``stale``, ``replay`` or
    ``decrypt-failed``."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"envelope rejected ({reason})" + (f": {detail}" if detail else ""))
        self.reason = reason


class DialFailed(RemoteError):
    """A session could not be set up before ICE: the callee did not resolve in time, did
    not answer, or refused. ``reason`` is a short tag, ``detail`` says why. (Failures of
    ICE and DTLS themselves raise :class:`ConnectFailed`.)"""

    def __init__(self, node_id: str, reason: str, detail: str) -> None:
        super().__init__(f"{node_id}: {detail}")
        self.node_id = node_id
        self.reason = reason
        self.detail = detail


class SessionClosed(DhtSignalError):
    """The session is closed: it can no longer send, and nothing more will arrive."""


SessionClosedError = SessionClosed
"""The former name of :class:`SessionClosed`, kept for programs that catch it."""


class ConnectFailed(RemoteError):
    """The WebRTC connection did not open. ``reason`` is ``ice-failed``, ``dtls-failed``,
    ``closed`` or ``timeout``; the candidate types say what was gathered, received and
    tried (``tried`` holds ``local->remote`` type pairs)."""

    def __init__(
        self,
        reason: str,
        seconds: float,
        local_types: tuple[str, ...],
        remote_types: tuple[str, ...],
        tried: tuple[str, ...],
        *,
        hint: str = "",
    ) -> None:
        super().__init__(
            f"WebRTC connection failed ({reason}) after {seconds:.1f} s; "
            + self.describe(local_types, remote_types, tried)
            + (f"; {hint}" if hint else "")
        )
        self.hint = hint
        """What was missing: both NAT types, silent or refusing STUN/TURN servers,
        whether a TURN server is needed (empty if not known)."""
        self.reason = reason
        self.seconds = seconds
        self.local_types = local_types
        self.remote_types = remote_types
        self.tried = tried

    @staticmethod
    def describe(
        local_types: tuple[str, ...], remote_types: tuple[str, ...], tried: tuple[str, ...]
    ) -> str:
        """The candidate types as text, e.g. ``local candidates: host, srflx; ...``."""
        return (
            f"local candidates: {', '.join(local_types) or 'none'}; remote candidates: "
            f"{', '.join(remote_types) or 'none'}; pairs tried: {', '.join(tried) or 'none'}"
        )


class BindingFailed(ConnectFailed):
    """The connection opened, but the peer at the other end of it is not the key we dialed
    or accepted: its channel-binding signature over the DTLS certificate fingerprints does
    not verify under that key (``reason`` ``binding-failed``; see
    :mod:`dhtsignal.signaling.binding`). A relay that spliced two sessions causes this."""

    def __init__(self, remote_id: str, remote_key: bytes, seconds: float) -> None:
        RemoteError.__init__(
            self,
            f"channel binding failed with {remote_id}: the other end of the DTLS connection "
            f"did not prove it holds key {remote_key.hex()[:16]}... (its signature over the "
            "DTLS fingerprints, session id and both keys does not verify); a relay may have "
            "spliced two sessions (unknown key-share), so the session was closed",
        )
        self.reason = "binding-failed"
        self.seconds = seconds
        self.local_types = self.remote_types = self.tried = ()
        self.hint = ""
        self.remote_id = remote_id
        self.remote_key = remote_key


class DependencyChanged(DhtSignalError):
    """An installed library no longer has the internals dhtsignal reads (after an upgrade)."""


class SimulationStalled(UsageError):
    """The simulated network would wait forever (nothing in flight, no timer) or passed
    its virtual-time limit (:mod:`dhtsignal.testing.simnet`)."""
