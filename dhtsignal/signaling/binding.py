"""Channel binding: who signed the offer and answer is who holds the DTLS channel.

Theory of operation
-------------------
The envelopes prove who *sent* a description, not who is at the other end of the DTLS
connection that description set up. Without more, a relay can splice two sessions (an
unknown key-share, RFC 8844 section 2): mallory re-seals alice's offer, meant for
mallory, to bob under mallory's own key, and bob's answer back to alice. Every envelope
check passes, alice and bob then run ICE and DTLS with each other, and each believes the
other is mallory.

So once the data channel is open, each side sends one control message with an Ed25519
signature, under :data:`DOMAIN`, over :func:`transcript`: the session id, the signer's key,
the key the signer believes it is talking to, and the SHA-256 fingerprints of both DTLS
certificates as presented in the handshake (its own, then the remote's). Each side checks
the remote's signature against the key it dialed or accepted, with the fingerprints in the
mirrored order. Mallory is not on the DTLS path, so the signature alice sends bob is
alice's, over keys (alice, mallory): it fails under mallory's key on bob's side, and the
same holds the other way round. Both sides send at once when their channels open and
wait for the other's message, so the check costs at most one control-channel round trip
(about half of one when both channels open together). The signer's own key first and the
peer's second makes a reflected message fail too. No I/O here: the session sends and
receives the 64 bytes.
"""

from __future__ import annotations

import struct

from dhtsignal.identity import Identity, verify

DOMAIN = b"dhtsignal/channel-binding/v1\x00"
"""Signature context: keeps binding signatures apart from records' and envelopes'."""
FINGERPRINT_SIZE = 32
"""A SHA-256 certificate fingerprint."""
SIGNATURE_SIZE = 64
_LAYOUT = struct.Struct("!8s32s32s32s32s")


def transcript(
    session_id: bytes, signer_key: bytes, peer_key: bytes, signer_fp: bytes, peer_fp: bytes
) -> bytes:
    """The signed bytes: ``DOMAIN || session id || signer key || peer key || signer's
    certificate fingerprint || peer's certificate fingerprint``.

    :param session_id: the 8-byte session id.
    :param signer_key: the signer's Ed25519 key.
    :param peer_key: the Ed25519 key the signer believes is at the other end.
    :param signer_fp: SHA-256 of the signer's DTLS certificate (DER).
    :param peer_fp: SHA-256 of the certificate the signer's peer presented in DTLS.
    :raises ValueError: for a field of the wrong size.
    """
    if len(session_id) != 8 or {len(signer_key), len(peer_key)} != {32}:
        raise ValueError("a session id is 8 bytes and a key 32")
    if {len(signer_fp), len(peer_fp)} != {FINGERPRINT_SIZE}:
        raise ValueError("a certificate fingerprint is 32 bytes (SHA-256)")
    return DOMAIN + _LAYOUT.pack(session_id, signer_key, peer_key, signer_fp, peer_fp)


def sign(
    identity: Identity, peer_key: bytes, session_id: bytes, local_fp: bytes, remote_fp: bytes
) -> bytes:
    """Our binding signature for the session.

    :param identity: our identity.
    :param peer_key: the key we dialed or accepted.
    :param session_id: the session id.
    :param local_fp: our certificate's fingerprint as used in the handshake.
    :param remote_fp: the fingerprint of the certificate the remote presented.
    """
    return identity.sign(transcript(session_id, identity.public_key, peer_key, local_fp, remote_fp))


def check(
    local_key: bytes,
    peer_key: bytes,
    session_id: bytes,
    local_fp: bytes,
    remote_fp: bytes,
    signature: bytes,
) -> bool:
    """Whether ``signature`` is ``peer_key``'s binding of this very DTLS connection to us.

    :param local_key: our Ed25519 key.
    :param peer_key: the key we dialed or accepted.
    :param session_id: the session id.
    :param local_fp: our certificate's fingerprint as used in the handshake.
    :param remote_fp: the fingerprint of the certificate the remote presented.
    :param signature: what the remote sent.
    """
    if len(signature) != SIGNATURE_SIZE:
        return False
    signed = transcript(session_id, peer_key, local_key, remote_fp, local_fp)
    return verify(peer_key, signed, signature)
