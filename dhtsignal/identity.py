"""Node identity: an Ed25519 signing key and an X25519 key derived from it.

The X25519 key is derived from the Ed25519 seed with HKDF, so one 32-byte secret
is all a data directory holds. The X25519 public key reaches others inside the
Ed25519-signed presence record, which binds the two.

The key file (``identity.key``, mode 0600) is versioned and checksummed::

    KEY_MAGIC (14 bytes) || version (1) || seed (32) || SHA-256(all before)[:16]

so a damaged file is refused instead of silently loading as another identity (which
would lose the node ID's claim and every pin others hold). A raw 32-byte file, the
format before version 1, still loads and is rewritten in the new format (logged); such
an old file carries no checksum, so damage to it cannot be told.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from nacl.bindings import crypto_sign_open
from nacl.exceptions import CryptoError

from dhtsignal.datadir import KEY_FILE, atomic_write, check_private, ensure_dir, tighten_modes
from dhtsignal.errors import ConfigError, UsageError

log = logging.getLogger(__name__)

SELF_ID_BYTES = 20
KEY_MAGIC = b"dhtsignal-key\x00"
"""The first bytes of a key file."""
KEY_VERSION = 1
_CHECKSUM = 16
KEY_FILE_SIZE = len(KEY_MAGIC) + 1 + 32 + _CHECKSUM
"""63 bytes."""
_RAW = serialization.Encoding.Raw
_RAW_PUB = serialization.PublicFormat.Raw
_RAW_PRIV = serialization.PrivateFormat.Raw
_NOENC = serialization.NoEncryption()


def self_certifying_id(public_key: bytes) -> str:
    """The self-certifying node ID of a key: hex of ``sha256(key)[:20]``.

    :param public_key: 32-byte Ed25519 public key.
    """
    return hashlib.sha256(public_key).digest()[:SELF_ID_BYTES].hex()


def is_self_certifying(node_id: str) -> bool:
    """Whether ``node_id`` has the self-certifying form (40 lowercase hex digits)."""
    if len(node_id) != 2 * SELF_ID_BYTES:
        return False
    try:
        bytes.fromhex(node_id)
    except ValueError:
        return False
    return node_id == node_id.lower()


def verify(public_key: bytes, message: bytes, signature: bytes) -> bool:
    """Check an Ed25519 signature; never raises on bad input.

    Verification uses libsodium (PyNaCl), signing stays with ``cryptography``. Every
    storing node verifies every record it is sent, and here libsodium's verify takes
    about half the time of OpenSSL's (72 against 139 µs, see the README's performance
    section). libsodium is also the stricter of the two: it refuses small-order keys
    and non-canonical encodings that OpenSSL may accept.
    """
    if len(public_key) != 32 or len(signature) != 64:
        return False
    try:
        crypto_sign_open(signature + message, public_key)
    except (CryptoError, ValueError, TypeError):
        return False
    return True


def key_file_bytes(seed: bytes) -> bytes:
    """The key file content for ``seed`` (see the module docstring).

    :param seed: the 32-byte Ed25519 private key.
    """
    head = KEY_MAGIC + bytes([KEY_VERSION]) + seed
    return head + hashlib.sha256(head).digest()[:_CHECKSUM]


def parse_key_file(blob: bytes, path: Path) -> bytes:
    """The seed in a key file's content.

    :param blob: the file's bytes.
    :param path: the file (named by the error).
    :raises ConfigError: the content is damaged, or of a version this dhtsignal cannot read.
    """
    fix = (
        "refusing to start with it (that would silently be another identity); restore it "
        "from a backup, or move it away to create a new identity"
    )
    if not blob.startswith(KEY_MAGIC):
        raise ConfigError(
            "data_dir", f"{path} is not a dhtsignal identity key or is damaged; {fix}"
        )
    version = blob[len(KEY_MAGIC)] if len(blob) > len(KEY_MAGIC) else None
    if version != KEY_VERSION:
        raise ConfigError(
            "data_dir",
            f"{path} is an identity key of version {version} (this dhtsignal reads "
            f"{KEY_VERSION}); use the dhtsignal that wrote it",
        )
    head, check = blob[:-_CHECKSUM], blob[-_CHECKSUM:]
    if len(blob) != KEY_FILE_SIZE or hashlib.sha256(head).digest()[:_CHECKSUM] != check:
        raise ConfigError("data_dir", f"{path} is damaged (its checksum does not match); {fix}")
    return head[len(KEY_MAGIC) + 1 :]


class Identity:
    """An Ed25519 signing key with its derived X25519 key.

    :param seed: the 32-byte Ed25519 private key.
    """

    __slots__ = ("_signing", "public_key", "self_id", "x25519_private", "x25519_public")

    def __init__(self, seed: bytes) -> None:
        if len(seed) != 32:
            raise UsageError("an identity seed is 32 bytes")
        self._signing = Ed25519PrivateKey.from_private_bytes(seed)
        self.public_key: bytes = self._signing.public_key().public_bytes(_RAW, _RAW_PUB)
        x_seed = HKDF(
            algorithm=hashes.SHA256(), length=32, salt=None, info=b"dhtsignal/x25519"
        ).derive(seed)
        self.x25519_private = X25519PrivateKey.from_private_bytes(x_seed)
        self.x25519_public: bytes = self.x25519_private.public_key().public_bytes(_RAW, _RAW_PUB)
        self.self_id: str = self_certifying_id(self.public_key)

    @classmethod
    def generate(cls) -> Identity:
        """A fresh random identity (used by short-lived commands and tests)."""
        return cls(os.urandom(32))

    @classmethod
    def load_or_create(cls, data_dir: Path) -> Identity:
        """Load ``identity.key`` from ``data_dir``, creating it (mode 0600) if absent.

        :param data_dir: the daemon's data directory; created if missing.
        :raises ConfigError: the directory or the key file is unusable (the ``data_dir``
            setting, naming the path): not a directory, not writable, writable by group or
            others, owned by another user (:func:`~dhtsignal.datadir.check_private`), or a
            key file that is damaged or of an unknown version. A damaged file is never
            replaced.
        """
        path = data_dir / KEY_FILE
        ensure_dir(data_dir)
        try:
            check_private(data_dir, path)
            if path.exists():
                blob = path.read_bytes()
                if len(blob) == 32:  # the raw seed of old versions: migrate it
                    tighten_modes(data_dir, path)
                    atomic_write(path, key_file_bytes(blob), mode=0o600)
                    log.warning(
                        "%s was a raw 32-byte key (the old format); rewrote it in the "
                        "versioned, checksummed format (same identity)",
                        path,
                    )
                    return cls(blob)
                seed = parse_key_file(blob, path)  # refused before any mode is changed
                tighten_modes(data_dir, path)
                return cls(seed)
            tighten_modes(data_dir, path)
            seed = os.urandom(32)
            atomic_write(path, key_file_bytes(seed), mode=0o600)
        except OSError as exc:
            where = exc.filename or data_dir
            raise ConfigError("data_dir", f"{where}: {exc.strerror or exc}") from None
        return cls(seed)

    def seed(self) -> bytes:
        """The raw 32-byte private key (for persistence only)."""
        return self._signing.private_bytes(_RAW, _RAW_PRIV, _NOENC)

    def sign(self, message: bytes) -> bytes:
        """Sign ``message``; returns 64 bytes."""
        return self._signing.sign(message)
