"""Sealed signaling envelopes: signed by the sender, readable only by the recipient.

Theory of operation
-------------------

An envelope carries one signaling message (a compact offer, answer or close) through DHT
nodes that may drop, delay, replay, alter or flood. It owes them nothing and does no I/O;
the caller passes ``now``.

Layout (all integers big-endian)::

    offset  size  field
         0     1  version (1)
         1     1  msg_type (:class:`MessageType`)
         2     8  session id
        10     8  sent at, milliseconds since the Unix epoch
        18     8  recipient hint: the first 8 bytes of the recipient's Ed25519 key
        26    32  sender's Ed25519 public key
        58    32  ephemeral X25519 public key
        90  n+16  ChaCha20-Poly1305 ciphertext of the n-byte body, with its tag
    end-64    64  Ed25519 signature

Overhead: 90 + 16 + 64 = **170 bytes** on top of the body.

Sealing: a fresh ephemeral X25519 key agrees a secret with the recipient's X25519 key
(RFC 7748); HKDF-SHA256 (RFC 5869, salt = ephemeral key || recipient X25519 key) turns it
into a ChaCha20-Poly1305 key (RFC 8439). The key is new for every envelope, so the nonce
is fixed at zero. The AEAD's associated data is the first 58 bytes (version, msg_type, session
id, time, hint, sender key) followed by the recipient's full Ed25519 key. The sender signs
``DOMAIN || recipient Ed25519 key || everything before the signature``, so the signature
covers the ciphertext, cannot be swapped by a relaying node, and cannot be mistaken for a
record signature made with the same key.

Opening checks, in order, each refusal a :class:`~dhtsignal.errors.EnvelopeRejected`
with its reason tag: shape and version (``malformed``), hint (``wrong-recipient``),
signature (``bad-signature``), ``|now - sent_at| <= max_age`` (``stale``), the
:class:`ReplayCache` (``replay``; ``replay-full`` or ``replay-quota`` when it has no room
for one more, see there), then decryption (``decrypt-failed``: a sender that
rebinds someone else's ciphertext to its own key lands here). Only envelopes that pass
every check enter the replay cache, keyed on a hash of (sender, session id, msg_type,
ephemeral key), through the last instant they are fresh (``sent_at + max_age``, the
same bound on both checks).
"""

from __future__ import annotations

import hashlib
import heapq
import logging
import struct
from dataclasses import dataclass
from enum import IntEnum

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from dhtsignal.errors import EnvelopeRejected, UsageError
from dhtsignal.identity import Identity, verify

logger = logging.getLogger(__name__)

VERSION = 1
DOMAIN = b"dhtsignal/envelope/v1\x00"
"""Signature and key-derivation context: keeps envelope signatures apart from records'."""
HEADER = struct.Struct("!BB8sQ8s32s32s")
"""version, msg_type, session id, sent-at ms, recipient hint, sender key, ephemeral key."""
AAD_END = 58
"""The header bytes bound as associated data (all but the ephemeral key)."""
HINT_SIZE = 8
SESSION_ID_SIZE = 8
TAG_SIZE = 16
SIGNATURE_SIZE = 64
OVERHEAD = HEADER.size + TAG_SIZE + SIGNATURE_SIZE
"""170 bytes."""
NONCE = bytes(12)
DEFAULT_MAX_AGE = 30.0
"""Seconds an envelope stays acceptable, either side of the recipient's clock."""
DEFAULT_REPLAY_ENTRIES = 4096
DEFAULT_PER_SENDER = 64
"""Live replay-cache entries of one sender key (64 envelopes within a minute)."""
REPLAY_KEY_SIZE = 16


class MessageType(IntEnum):
    """What an envelope carries."""

    OFFER = 1
    ANSWER = 2
    CLOSE = 3
    """Ends a session, or refuses an offer (alias :attr:`REJECT`)."""
    REJECT = 3


_MESSAGE_TYPES = frozenset(MessageType)


@dataclass(frozen=True)
class Opened:
    """An envelope that passed every check."""

    sender_key: bytes
    """The sender's Ed25519 public key."""
    session_id: bytes
    msg_type: MessageType
    body: bytes
    sent_at: float
    """The sender's clock at sealing, in seconds since the Unix epoch."""


class ReplayCache:
    """Remembers opened envelopes until they go stale, within fixed bounds.

    An entry is live through its expiry, ``sent_at + max_age``, inclusive: the same
    instant up to which :func:`open_envelope` accepts the envelope as fresh, so no
    envelope is ever fresh and forgotten at once. When the cache is full of live entries
    it refuses new envelopes (``replay-full``) instead of evicting one: eviction would
    let a flood of valid envelopes from throwaway keys push out a genuine entry, which
    would then open a second time. One sender key holds at most ``max_per_sender`` live
    entries (``replay-quota``), so a single key cannot fill it. A key is remembered as a
    16-byte hash, about 150 bytes per entry in all.

    :param max_entries: the bound on remembered envelopes.
    :param max_per_sender: the bound on remembered envelopes of one sender key.
    """

    def __init__(
        self, max_entries: int = DEFAULT_REPLAY_ENTRIES, max_per_sender: int = DEFAULT_PER_SENDER
    ) -> None:
        if max_entries < 1 or max_per_sender < 1:
            raise UsageError("a replay cache holds at least one entry, per sender too")
        self.max_entries = max_entries
        self.max_per_sender = max_per_sender
        self._expiry: dict[bytes, float] = {}
        self._heap: list[tuple[float, bytes, bytes]] = []
        self._per_sender: dict[bytes, int] = {}

    def __len__(self) -> int:
        return len(self._expiry)

    def seen(self, key: bytes, now: float) -> bool:
        """Whether ``key`` was added and is live (``now`` at most its expiry).

        :param key: the replay key.
        :param now: the current time.
        """
        expiry = self._expiry.get(key)
        return expiry is not None and expiry >= now

    def refusal(self, sender: bytes, now: float) -> str | None:
        """Why a new envelope of ``sender`` cannot be remembered now, or None if it can.

        :param sender: the sender's key.
        :param now: the current time (expired entries are dropped first).
        :returns: ``replay-full`` or ``replay-quota``.
        """
        self._expire(now)
        if len(self._expiry) >= self.max_entries:
            return "replay-full"
        if self._per_sender.get(sender, 0) >= self.max_per_sender:
            return "replay-quota"
        return None

    def add(self, key: bytes, expires: float, now: float, sender: bytes = b"") -> None:
        """Remember ``key`` until ``expires`` (call :meth:`refusal` first).

        :param key: the replay key; must not be remembered already.
        :param expires: the last instant the envelope is fresh.
        :param now: the current time.
        :param sender: the sender's key, for the per-sender quota.
        :raises UsageError: there is no room (:meth:`refusal` says why).
        """
        why = self.refusal(sender, now)
        if why is not None:
            raise UsageError(f"the replay cache has no room ({why})")
        self._expiry[key] = expires
        self._per_sender[sender] = self._per_sender.get(sender, 0) + 1
        heapq.heappush(self._heap, (expires, key, sender))

    def _expire(self, now: float) -> None:
        heap = self._heap
        while heap and heap[0][0] < now:
            _, key, sender = heapq.heappop(heap)
            del self._expiry[key]
            left = self._per_sender[sender] - 1
            if left:
                self._per_sender[sender] = left
            else:
                del self._per_sender[sender]


def seal(
    sender: Identity,
    recipient_ed25519: bytes,
    recipient_x25519: bytes,
    session_id: bytes,
    msg_type: MessageType,
    body: bytes,
    now: float,
) -> bytes:
    """Encrypt ``body`` to the recipient and sign the result.

    :param sender: the local identity.
    :param recipient_ed25519: the recipient's Ed25519 public key (32 bytes).
    :param recipient_x25519: the recipient's X25519 public key (32 bytes), taken from its
        signed presence record.
    :param session_id: 8 bytes naming the session.
    :param msg_type: what the body is.
    :param body: the plaintext.
    :param now: the current time, seconds since the Unix epoch.
    :raises UsageError: for keys or a session id of the wrong size.
    """
    if len(recipient_ed25519) != 32 or len(session_id) != SESSION_ID_SIZE:
        raise UsageError("a recipient key is 32 bytes and a session id 8 bytes")
    ephemeral = X25519PrivateKey.generate()
    ephemeral_public = ephemeral.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    try:
        shared = ephemeral.exchange(X25519PublicKey.from_public_bytes(recipient_x25519))
    except ValueError as exc:
        raise UsageError(f"invalid recipient X25519 key: {exc}") from exc
    header = HEADER.pack(
        VERSION,
        MessageType(msg_type),
        session_id,
        round(now * 1000),
        recipient_ed25519[:HINT_SIZE],
        sender.public_key,
        ephemeral_public,
    )
    ciphertext = ChaCha20Poly1305(_key(shared, ephemeral_public, recipient_x25519)).encrypt(
        NONCE, body, header[:AAD_END] + recipient_ed25519
    )
    signed = header + ciphertext
    return signed + sender.sign(DOMAIN + recipient_ed25519 + signed)


def open_envelope(
    recipient: Identity,
    blob: bytes,
    now: float,
    replay: ReplayCache,
    max_age: float = DEFAULT_MAX_AGE,
) -> Opened:
    """Check, decrypt and record an envelope addressed to ``recipient``.

    :param recipient: the local identity.
    :param blob: the envelope as received.
    :param now: the current time, seconds since the Unix epoch.
    :param replay: the cache of envelopes already opened.
    :param max_age: the largest accepted ``|now - sent_at|`` in seconds.
    :raises EnvelopeRejected: with the reason tag of the first check that failed.
    """
    if len(blob) < OVERHEAD:
        raise _reject("malformed", f"{len(blob)} bytes is shorter than {OVERHEAD}")
    version, msg_type, session_id, sent_ms, hint, sender_key, ephemeral_public = HEADER.unpack_from(
        blob
    )
    if version != VERSION or msg_type not in _MESSAGE_TYPES:
        raise _reject("malformed", f"version {version}, msg_type {msg_type}")
    if hint != recipient.public_key[:HINT_SIZE]:
        raise _reject("wrong-recipient", f"hint {hint.hex()}")
    signed, signature = blob[:-SIGNATURE_SIZE], blob[-SIGNATURE_SIZE:]
    if not verify(sender_key, DOMAIN + recipient.public_key + signed, signature):
        raise _reject("bad-signature", f"sender {sender_key.hex()[:16]}")
    sent_at = sent_ms / 1000
    if abs(now - sent_at) > max_age:
        raise _reject("stale", f"sent {now - sent_at:+.1f} s ago")
    replay_key = hashlib.sha256(blob[1:10] + sender_key + ephemeral_public).digest()[
        :REPLAY_KEY_SIZE
    ]
    if replay.seen(replay_key, now):
        raise _reject("replay", f"session {session_id.hex()}")
    full = replay.refusal(sender_key, now)
    if full is not None:  # refused rather than forget an envelope that could then reopen
        raise _reject(full, f"sender {sender_key.hex()[:16]}")
    try:
        shared = recipient.x25519_private.exchange(
            X25519PublicKey.from_public_bytes(ephemeral_public)
        )
        body = ChaCha20Poly1305(_key(shared, ephemeral_public, recipient.x25519_public)).decrypt(
            NONCE, signed[HEADER.size :], signed[:AAD_END] + recipient.public_key
        )
    except (ValueError, InvalidTag) as exc:
        raise _reject("decrypt-failed", type(exc).__name__) from None
    replay.add(replay_key, sent_at + max_age, now, sender_key)
    return Opened(sender_key, session_id, MessageType(msg_type), body, sent_at)


def _key(shared: bytes, ephemeral_public: bytes, recipient_x25519: bytes) -> bytes:
    return HKDF(
        algorithm=hashes.SHA256(), length=32, salt=ephemeral_public + recipient_x25519, info=DOMAIN
    ).derive(shared)


def _reject(reason: str, detail: str) -> EnvelopeRejected:
    logger.debug("refused an envelope: %s (%s)", reason, detail)
    return EnvelopeRejected(reason, detail)
