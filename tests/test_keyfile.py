"""The identity key file: versioned and checksummed, old files migrated, damage and
unsafe ownership or modes refused (in process and through the CLI, exit 2)."""

from __future__ import annotations

import logging
import os
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from dhtsignal.datadir import KEY_FILE, atomic_write
from dhtsignal.errors import ConfigError
from dhtsignal.identity import KEY_FILE_SIZE, KEY_MAGIC, Identity, key_file_bytes

OTHER_UID = 65534  # "nobody"
CLI_TIMEOUT = 20.0


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _data_dir(tmp_path: Path) -> tuple[Path, Path, Identity]:
    data = tmp_path / "data"
    ident = Identity.load_or_create(data)
    return data, data / KEY_FILE, ident


def test_key_file_is_versioned_and_checksummed(tmp_path: Path) -> None:
    data, key, ident = _data_dir(tmp_path)
    blob = key.read_bytes()
    assert len(blob) == KEY_FILE_SIZE and blob.startswith(KEY_MAGIC)
    assert blob == key_file_bytes(ident.seed())
    assert Identity.load_or_create(data).public_key == ident.public_key


def test_old_raw_key_file_is_migrated_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    seed = os.urandom(32)
    (data / KEY_FILE).write_bytes(seed)
    os.chmod(data / KEY_FILE, 0o600)
    with caplog.at_level(logging.WARNING):
        ident = Identity.load_or_create(data)
    assert ident.seed() == seed
    assert (data / KEY_FILE).read_bytes() == key_file_bytes(seed)
    assert "old format" in caplog.text and str(data / KEY_FILE) in caplog.text
    assert Identity.load_or_create(data).public_key == ident.public_key


@pytest.mark.parametrize("where", [0, len(KEY_MAGIC), len(KEY_MAGIC) + 5, KEY_FILE_SIZE - 1])
def test_a_flipped_bit_is_refused_not_a_new_identity(tmp_path: Path, where: int) -> None:
    data, key, _ = _data_dir(tmp_path)
    damaged = bytearray(key.read_bytes())
    damaged[where] ^= 0x04
    key.write_bytes(bytes(damaged))
    with pytest.raises(ConfigError) as err:
        Identity.load_or_create(data)
    assert str(key) in str(err.value)
    assert key.read_bytes() == bytes(damaged)  # never replaced


def test_truncated_key_file_is_refused(tmp_path: Path) -> None:
    data, key, _ = _data_dir(tmp_path)
    key.write_bytes(key.read_bytes()[:-1])
    with pytest.raises(ConfigError, match="damaged"):
        Identity.load_or_create(data)


def test_group_writable_data_dir_is_refused_naming_the_fix(tmp_path: Path) -> None:
    data, _, _ = _data_dir(tmp_path)
    os.chmod(data, 0o770)
    with pytest.raises(ConfigError) as err:
        Identity.load_or_create(data)
    assert str(data) in str(err.value) and "chmod 700" in str(err.value)
    os.chmod(data, 0o707)
    with pytest.raises(ConfigError, match="writable by group or others"):
        Identity.load_or_create(data)


def test_loose_modes_are_fixed_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data, key, ident = _data_dir(tmp_path)
    os.chmod(data, 0o755)
    os.chmod(key, 0o644)
    with caplog.at_level(logging.WARNING):
        assert Identity.load_or_create(data).public_key == ident.public_key
    assert _mode(data) == 0o700 and _mode(key) == 0o600
    assert str(data) in caplog.text and str(key) in caplog.text


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file away needs root")
def test_key_file_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    data, key, _ = _data_dir(tmp_path)
    os.chown(key, OTHER_UID, -1)
    with pytest.raises(ConfigError) as err:
        Identity.load_or_create(data)
    assert str(key) in str(err.value) and f"uid {OTHER_UID}" in str(err.value)


def test_temporary_files_are_unique_and_cleaned(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "f"
    names: list[str] = []
    real_replace = os.replace

    def spy(src: str | Path, dst: str | Path) -> None:
        names.append(os.path.basename(src))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    atomic_write(target, b"one")
    atomic_write(target, b"two")
    assert len(set(names)) == 2 and all(n.startswith(".f.") for n in names)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]
    assert target.read_bytes() == b"two"


# -- through the CLI: each refusal exits 2 and names the path ------------------------------


def _bootstrap(data: Path, home: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DHTSIGNAL_")}
    env["XDG_DATA_HOME"] = str(home)
    args = ["bootstrap", "--listen", "127.0.0.1:0", "--data-dir", str(data)]
    return subprocess.run(
        [sys.executable, "-m", "dhtsignal", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=CLI_TIMEOUT,
        stdin=subprocess.DEVNULL,
    )


def _damage(data: Path, key: Path) -> Path:
    blob = bytearray(key.read_bytes())
    blob[20] ^= 1
    key.write_bytes(bytes(blob))
    return key


def _writable(data: Path, key: Path) -> Path:
    os.chmod(data, 0o777)
    return data


def _foreign(data: Path, key: Path) -> Path:
    os.chown(key, OTHER_UID, -1)
    return key


@pytest.mark.parametrize(
    ("spoil", "words"),
    [
        (_damage, "damaged"),
        (_writable, "writable by group or others"),
        pytest.param(
            _foreign,
            f"owned by uid {OTHER_UID}",
            marks=pytest.mark.skipif(os.geteuid() != 0, reason="giving a file away needs root"),
        ),
    ],
)
def test_cli_refuses_with_exit_2_naming_the_path(
    tmp_path: Path, spoil: Callable[[Path, Path], Path], words: str
) -> None:
    data, key, _ = _data_dir(tmp_path)
    named = spoil(data, key)
    before = key.read_bytes()
    res = _bootstrap(data, tmp_path / "xdg")
    assert res.returncode == 2, res.stderr
    assert str(named) in res.stderr and words in res.stderr
    assert "Traceback" not in res.stderr
    assert key.read_bytes() == before
