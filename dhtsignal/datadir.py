"""The data directory: what lives in it, how it is written, and who may use it.

Theory of operation
-------------------
A daemon's data directory (mode 0700) holds its identity key (:data:`KEY_FILE`, see
:mod:`dhtsignal.identity`), its DHT state (:data:`STATE_FILE`: contacts, stored records,
plain values), the pins of node IDs it has seen (:data:`KNOWN_PEERS_FILE`,
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
import stat
import tempfile
from collections.abc import Iterator
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


class KnownPeers:
    """Pinned keys of node IDs, one ``NODE_ID KEYHEX`` per line (``#`` starts a comment).

    Several processes may pin into one file at once (two ``lookup`` runs, ``peers``
    beside a dialer). :meth:`pin` therefore holds :func:`locked` on ``FILE.lock`` next
    to it while it re-reads the file, adds its line to what it read, and replaces the
    file with :func:`atomic_write`: no pin is lost and a reader never sees half a file.
    The file is the truth: a pin another process wrote since this object read the file
    counts for it too. A new file is created with mode 0600; a rewrite keeps the mode
    the file had.

    :param path: the file; None keeps the pins in memory only.
    :raises ConfigError: the file cannot be read or is malformed (names ``known_peers``).
    """

    SETTING = "known_peers"
    """The setting named by the errors (``--known-peers``)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._pins: dict[str, str] = {}
        if path is not None:
            self._pins = self._parse(self._read(path), path)

    def get(self, node_id: str) -> str | None:
        """The pinned key of ``node_id`` (hex), if any."""
        return self._pins.get(node_id)

    def pin(self, node_id: str, key: str) -> None:
        """Pin ``key`` for ``node_id`` (trust on first use).

        :raises PinnedKeyChanged: another key is pinned already (also by another process).
        :raises ConfigError: the file cannot be written.
        """
        key = key.lower()
        old = self._pins.get(node_id)
        if old == key:
            return
        if old is not None:
            raise PinnedKeyChanged(node_id, old, key)
        if self.path is None:
            self._pins[node_id] = key
            return
        try:
            self._pins = self._add_to_file(self.path, node_id, key)
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise ConfigError(self.SETTING, f"cannot write {self.path}: {reason}") from None
        if self._pins[node_id] != key:
            raise PinnedKeyChanged(node_id, self._pins[node_id], key)

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
    def _parse(cls, text: str, path: Path) -> dict[str, str]:
        pins: dict[str, str] = {}
        for n, line in enumerate(text.splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.split()
            if len(parts) != 2 or not cls._is_key(parts[1]):
                raise ConfigError(
                    cls.SETTING,
                    f"{path}:{n}: expected 'NODE_ID KEYHEX' (64 hex digits), got {line[:80]!r}",
                )
            pins[parts[0]] = parts[1].lower()
        return pins

    @staticmethod
    def _is_key(text: str) -> bool:
        try:
            return len(bytes.fromhex(text)) == 32
        except ValueError:
            return False

    @classmethod
    def _add_to_file(cls, path: Path, node_id: str, key: str) -> dict[str, str]:
        """Under the lock: re-read, append ``node_id key`` unless pinned, replace the file.

        :returns: the pins in the file afterwards.
        """
        path.parent.mkdir(parents=True, exist_ok=True)
        with locked(path.with_name(path.name + ".lock")):
            text = cls._read(path)
            pins = cls._parse(text, path)
            if node_id in pins:
                return pins
            if text and not text.endswith("\n"):
                text += "\n"
            text += f"{node_id} {key}\n"
            atomic_write(path, text.encode())
            pins[node_id] = key
            return pins
