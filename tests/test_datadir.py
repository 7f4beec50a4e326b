"""The data directory's files: atomic writes, locks, and errors that name the setting."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from dhtsignal.datadir import DataDirLock, atomic_write, ensure_dir, locked
from dhtsignal.errors import ConfigError, UsageError


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_atomic_write_creates_private_files_and_keeps_a_rewritten_files_mode(
    tmp_path: Path,
) -> None:
    path = tmp_path / "f"
    atomic_write(path, b"one")
    assert path.read_bytes() == b"one" and _mode(path) == 0o600
    path.chmod(0o640)
    atomic_write(path, b"two")
    assert path.read_bytes() == b"two" and _mode(path) == 0o640
    atomic_write(path, b"three", mode=0o600)
    assert _mode(path) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["f"]  # no temporary left


def test_a_failed_atomic_write_leaves_the_old_file_and_no_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "f"
    atomic_write(path, b"old")

    def full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError, match="No space"):
        atomic_write(path, b"new")
    monkeypatch.undo()
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f"]


def test_ensure_dir_names_the_setting(tmp_path: Path) -> None:
    ensure_dir(tmp_path / "a" / "b")
    assert _mode(tmp_path / "a" / "b") == 0o700
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError) as err:
        ensure_dir(tmp_path / "file", "known_peers")
    assert err.value.setting == "known_peers" and "is not a directory" in str(err.value)


def test_data_dir_lock_keeps_a_second_holder_out(tmp_path: Path) -> None:
    first, second = DataDirLock(tmp_path / "d"), DataDirLock(tmp_path / "d")
    first.acquire()
    try:
        with pytest.raises(UsageError, match="in use by another dhtsignal process"):
            second.acquire()
    finally:
        first.release()
    second.acquire()  # free again once released
    second.release()


def test_locked_creates_a_private_lock_file(tmp_path: Path) -> None:
    lock = tmp_path / "x.lock"
    with locked(lock):
        assert lock.exists() and _mode(lock) == 0o600
