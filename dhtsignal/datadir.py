"""The data directory: what lives in it, how it is written, and who may use it.

Theory of operation
-------------------
A daemon's data directory (mode 0700) holds its identity key (:data:`KEY_FILE`, see
:mod:`dhtsignal.identity`), its DHT state (:data:`STATE_FILE`: contacts, stored records,
plain values), the pins of node IDs it has seen, per network id (:data:`KNOWN_PEERS_FILE`,
:class:`KnownPeers`) and the lock that keeps a second daemon out (:data:`LOCK_FILE`,
:class:`DataDirLock`).

Every file is written with :func:`atomic_write`: a temporary file of its own in the same
directory (``mkstemp``, a unique name, so two processes never share one), fsynced, then
``os.replace``, then the directory fsynced so that the rename itself survives a crash: a
reader never sees half a file and a crash leaves the old one or the new one. Processes
that read, change and write one file (two lookups pinning into one known-peers file)
serialise through :func:`locked`, an exclusive :func:`fcntl.flock` on a ``.lock`` file
beside it.

Who may use it: :func:`check_private` refuses a directory that group or others may write
(anyone who can write there can replace the key file), and a directory or key file owned
by another user, naming the path and the fix; read or search bits for group or others on
the directory, and any group or others bits on the key file, are fixed with a warning
(:func:`tighten_modes`).

Problems with the directory itself are :class:`~dhtsignal.errors.ConfigError` naming the
``data_dir`` setting (or ``known_peers`` for the pin file), never a traceback.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shlex
import stat
import tempfile
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from dhtsignal.errors import ConfigError, PinnedKeyChanged, UsageError

log = logging.getLogger(__name__)

KEY_FILE = "identity.key"
STATE_FILE = "state.msgpack"
KNOWN_PEERS_FILE = "known_peers"
LOCK_FILE = "lock"


def ensure_dir(data_dir: Path, setting: str = "data_dir") -> None:
    """Create ``data_dir`` (mode 0700, parents too) if it is missing.

    :param data_dir: the directory.
    :param setting: the setting named by the error.
    :raises ConfigError: it exists and is not a directory, or cannot be created.
    """
    try:
        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    except FileExistsError:
        raise ConfigError(setting, f"{data_dir} is not a directory") from None
    except OSError as exc:
        raise ConfigError(setting, f"{exc.filename or data_dir}: {exc.strerror or exc}") from None


def atomic_write(path: Path, data: bytes, mode: int | None = None) -> None:
    """Replace ``path`` with ``data`` so that a reader sees the old file or the new one.

    :param path: the file; its directory must exist.
    :param data: the new content.
    :param mode: the new file's mode; None keeps an existing file's mode and gives a
        new file 0600.
    :raises OSError: the file could not be written (the old one is then untouched).
    """
    if mode is None:
        try:
            mode = stat.S_IMODE(path.stat().st_mode)
        except FileNotFoundError:
            mode = 0o600
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fchmod(fh.fileno(), mode)
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def fsync_dir(directory: Path) -> None:
    """Flush ``directory``'s entries (a rename in it) to disk.

    :param directory: the directory.
    :raises OSError: it cannot be opened.
    """
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_private(data_dir: Path, key_file: Path, setting: str = "data_dir") -> None:
    """Refuse a data directory others could tamper with (changes nothing; see
    :func:`tighten_modes` for the modes that are only loose).

    :param data_dir: the directory (it exists).
    :param key_file: the identity key file in it (it may not exist yet).
    :param setting: the setting named by the error.
    :raises ConfigError: the directory is writable by group or others, or it or the key
        file is owned by another user; the message names the path and the fix.
    """
    me = os.geteuid()
    st = data_dir.stat()
    if st.st_uid != me:
        raise ConfigError(
            setting,
            f"{data_dir} is owned by uid {st.st_uid}, not by this user (uid {me}): use a data "
            f"directory of your own, or 'chown {me} {data_dir}'",
        )
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o022:
        raise ConfigError(
            setting,
            f"{data_dir} is writable by group or others (mode {mode:04o}), so they could "
            f"replace the identity key: 'chmod 700 {data_dir}' and check its files",
        )
    try:
        kst = key_file.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISREG(kst.st_mode):
        raise ConfigError(
            setting, f"{key_file} is not a regular file: move it away and start again"
        )
    if kst.st_uid != me:
        raise ConfigError(
            setting,
            f"{key_file} is owned by uid {kst.st_uid}, not by this user (uid {me}): someone "
            f"else's key is not yours to use; 'chown {me} {key_file}' if it is yours",
        )


def tighten_modes(data_dir: Path, key_file: Path) -> None:
    """Take group and others' bits off the data directory (0700) and the key file (0600),
    with a warning naming each path changed.

    :param data_dir: the directory, checked by :func:`check_private`.
    :param key_file: the identity key file (it may not exist yet).
    :raises OSError: a mode cannot be changed.
    """
    for path, private in ((data_dir, 0o700), (key_file, 0o600)):
        try:
            mode = stat.S_IMODE(path.stat().st_mode)
        except FileNotFoundError:
            continue
        if mode & 0o077:
            log.warning(
                "%s had mode %04o; set to %04o (it holds the identity key)", path, mode, private
            )
            os.chmod(path, private)


@contextlib.contextmanager
def locked(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``lock_path`` (created 0600 if missing) for a short
    read-change-write; waits for another holder.

    :param lock_path: the lock file.
    :raises OSError: the lock file cannot be opened.
    """
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the file releases the lock


class DataDirLock:
    """An exclusive lock on a data directory, held while a daemon runs.

    :param data_dir: the directory (created if missing).
    """

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock, without waiting.

        :raises ConfigError: the directory is unusable (the ``data_dir`` setting).
        :raises UsageError: another process holds it.
        """
        ensure_dir(self.data_dir)
        try:
            fd = os.open(self.data_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise ConfigError("data_dir", f"{self.data_dir}: {exc.strerror or exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise UsageError(
                f"data directory {self.data_dir} is in use by another dhtsignal process"
            ) from None
        self._fd = fd

    def release(self) -> None:
        """Drop the lock (closing the file releases it)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


#: The network id of a pin written without one (the file format before pins were scoped
#: per network); equal to :data:`dhtsignal.dht.params.DEFAULT_NETWORK` (a test checks it).
DEFAULT_NETWORK = "dhtsignal/1"
#: Characters of a network id written as they are in the pin file; others are %-escaped.
_NETWORK_SAFE = "/:@.-_~+="


@dataclass(frozen=True)
class Pin:
    """One line of the known-peers file."""

    network: str
    """The network id the pin belongs to."""
    node_id: str
    """The node ID (label or self-certifying ID)."""
    key: str
    """Hex of the pinned Ed25519 key."""


class KnownPeers:
    """Pinned keys of node IDs, per network id (like SSH's known_hosts).

    One ``NODE_ID KEYHEX [NETWORK]`` per line (``#`` starts a comment). A line without
    NETWORK belongs to :data:`DEFAULT_NETWORK`: files written before pins were scoped
    are read as they are (their pins were made in the default network, the only one most
    users have), and pins of the default network are still written that way. Other
    network ids are written %-escaped (no whitespace or ``#`` on the line). An object
    reads and writes the pins of its own ``network``; a pin of ``bob`` in one network
    never blocks ``bob`` in another.

    Several processes may pin into one file at once (two ``lookup`` runs, ``peers``
    beside a dialer). :meth:`pin` and :meth:`forget` therefore hold :func:`locked` on
    ``FILE.lock`` next to it while they re-read the file, change what they read, and
    replace the file with :func:`atomic_write`: no pin is lost and a reader never sees
    half a file. The file is the truth: a pin another process wrote since this object
    read the file counts for it too. A new file is created with mode 0600; a rewrite
    keeps the mode the file had.

    :param path: the file; None keeps the pins in memory only.
    :param network: the network id whose pins this object reads and writes.
    :raises ConfigError: the file cannot be read or is malformed (names ``known_peers``).
    """

    SETTING = "known_peers"
    """The setting named by the errors (``--known-peers``)."""

    def __init__(self, path: Path | None, network: str = DEFAULT_NETWORK) -> None:
        self.path = path
        self.network = network
        self._pins: dict[tuple[str, str], str] = {}
        if path is not None:
            self._pins = self._parse(self._read(path), path)

    def get(self, node_id: str) -> str | None:
        """The pinned key of ``node_id`` (hex) in our network, if any."""
        return self._pins.get((self.network, node_id))

    def entries(self) -> list[Pin]:
        """Every pin of the file (all networks), in file order."""
        return [Pin(net, nid, key) for (net, nid), key in self._pins.items()]

    def changed(self, node_id: str, pinned: str, seen: str) -> PinnedKeyChanged:
        """The error for ``node_id`` presented with key ``seen`` while ``pinned`` is pinned:
        it names the file, the network and the command that forgets the pin."""
        if self.path is None:
            remedy = f"the pins are kept in memory only: KnownPeers.forget({node_id!r})"
        else:
            remedy = f"dhtsignal pins forget {shlex.quote(node_id)}"
            if self.network != DEFAULT_NETWORK:
                remedy += f" --network {shlex.quote(self.network)}"
            remedy += f" --known-peers {shlex.quote(str(self.path))}"
        return PinnedKeyChanged(
            node_id,
            pinned,
            seen,
            path=str(self.path) if self.path is not None else "memory (not saved)",
            network=self.network,
            remedy=remedy,
        )

    def pin(self, node_id: str, key: str) -> None:
        """Pin ``key`` for ``node_id`` in our network (trust on first use).

        :raises PinnedKeyChanged: another key is pinned already (also by another process).
        :raises ConfigError: the file cannot be written.
        """
        key = key.lower()
        slot = (self.network, node_id)
        old = self._pins.get(slot)
        if old == key:
            return
        if old is not None:
            raise self.changed(node_id, old, key)
        if self.path is None:
            self._pins[slot] = key
            return
        try:
            self._pins = self._add_to_file(self.path, slot, key)
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise ConfigError(self.SETTING, f"cannot write {self.path}: {reason}") from None
        if self._pins[slot] != key:
            raise self.changed(node_id, self._pins[slot], key)

    def forget(self, node_id: str) -> str | None:
        """Remove the pin of ``node_id`` in our network; returns the key it had (None: no
        such pin). Comments and other lines of the file are kept as they are.

        :raises ConfigError: the file cannot be read, parsed or written.
        """
        slot = (self.network, node_id)
        if self.path is None:
            return self._pins.pop(slot, None)
        try:
            self._pins, old = self._remove_from_file(self.path, slot)
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise ConfigError(self.SETTING, f"cannot write {self.path}: {reason}") from None
        return old

    @classmethod
    def _read(cls, path: Path) -> str:
        try:
            return path.read_text()
        except FileNotFoundError:
            return ""
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise ConfigError(cls.SETTING, f"cannot read {path}: {reason}") from None

    @classmethod
    def _parse_line(cls, line: str, n: int, path: Path) -> tuple[tuple[str, str], str] | None:
        """``((network, node_id), key)`` of one line; None for a blank line or comment."""
        line = line.strip()
        if not line or line.startswith("#"):
            return None
        parts = line.split()
        if len(parts) not in (2, 3) or not cls._is_key(parts[1]):
            raise ConfigError(
                cls.SETTING,
                f"{path}:{n}: expected 'NODE_ID KEYHEX [NETWORK]' (64 hex digits), "
                f"got {line[:80]!r}; fix or delete that line",
            )
        network = urllib.parse.unquote(parts[2]) if len(parts) == 3 else DEFAULT_NETWORK
        return (network, parts[0]), parts[1].lower()

    @classmethod
    def _parse(cls, text: str, path: Path) -> dict[tuple[str, str], str]:
        pins: dict[tuple[str, str], str] = {}
        for n, line in enumerate(text.splitlines(), 1):
            entry = cls._parse_line(line, n, path)
            if entry is not None:
                pins.setdefault(entry[0], entry[1])
        return pins

    @staticmethod
    def _is_key(text: str) -> bool:
        try:
            return len(bytes.fromhex(text)) == 32
        except ValueError:
            return False

    @staticmethod
    def _line(slot: tuple[str, str], key: str) -> str:
        network, node_id = slot
        if network == DEFAULT_NETWORK:
            return f"{node_id} {key}\n"
        return f"{node_id} {key} {urllib.parse.quote(network, safe=_NETWORK_SAFE)}\n"

    @classmethod
    def _add_to_file(
        cls, path: Path, slot: tuple[str, str], key: str
    ) -> dict[tuple[str, str], str]:
        """Under the lock: re-read, append the pin unless one exists, replace the file.

        :returns: the pins in the file afterwards.
        """
        path.parent.mkdir(parents=True, exist_ok=True)
        with locked(path.with_name(path.name + ".lock")):
            text = cls._read(path)
            pins = cls._parse(text, path)
            if slot in pins:
                return pins
            if text and not text.endswith("\n"):
                text += "\n"
            text += cls._line(slot, key)
            atomic_write(path, text.encode())
            pins[slot] = key
            return pins

    @classmethod
    def _remove_from_file(
        cls, path: Path, slot: tuple[str, str]
    ) -> tuple[dict[tuple[str, str], str], str | None]:
        """Under the lock: re-read, drop the lines of ``slot``, replace the file if changed.

        :returns: the pins in the file afterwards and the key removed (None: none was).
        """
        if not path.exists():
            return {}, None
        with locked(path.with_name(path.name + ".lock")):
            text = cls._read(path)
            kept: list[str] = []
            removed: str | None = None
            for n, line in enumerate(text.splitlines(keepends=True), 1):
                entry = cls._parse_line(line, n, path)
                if entry is not None and entry[0] == slot:
                    removed = removed or entry[1]
                    continue
                kept.append(line)
            if removed is not None:
                atomic_write(path, "".join(kept).encode())
            return cls._parse("".join(kept), path), removed
