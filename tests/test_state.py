"""Persistence: ``DhtNode.save_state``/``load_state`` and ``Identity.load_or_create``.

A restarted node gets back its contacts, the records it held (verified again, expired
ones dropped) and the stock nodes' plain values; a damaged state file is a
:class:`UsageError` naming the file. The identity key file is private (mode 0600).
"""

from __future__ import annotations

import asyncio
import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from dhtsignal.aio.node import DhtNode
from dhtsignal.datadir import KEY_FILE, STATE_FILE
from dhtsignal.dht import records
from dhtsignal.dht.params import NodeConfig
from dhtsignal.dht.records import Record, RecordType
from dhtsignal.dht.routing import DIALECT_DS, Contact
from dhtsignal.dht.storage import StorageLimits
from dhtsignal.errors import UsageError
from dhtsignal.identity import KEY_FILE_SIZE, Identity
from dhtsignal.wire import codec

if TYPE_CHECKING:
    from conftest import StartDht

NOW = 1_700_000_000.0
STEP = 5.0
SOURCE = ("127.0.0.1", 4000)


class Clock:
    """A wall clock the test moves by hand (the node's ``wallclock`` hook)."""

    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _rec(who: Identity, key: bytes, seq: int, expires: float) -> Record:
    return records.sign(who, RecordType.DATA, key, b"v%d" % seq, seq=seq, expires=expires)


def _contacts(n: DhtNode) -> set[tuple[bytes, str, int, int]]:
    return {(c.id, c.ip, c.port, c.dialect) for c in n.table.contacts()}


def _offline_node(clock: Clock, config: NodeConfig | None = None) -> DhtNode:
    """A node with a few contacts, two records (one short-lived) and a plain value."""
    n = DhtNode(os.urandom(20), config, wallclock=clock)
    for i in range(3):
        n.table.add_contact(Contact(os.urandom(20), "127.0.0.1", 5000 + i, DIALECT_DS))
    key = records.data_key("offline")
    n.store.put(_rec(Identity.generate(), key, 1, NOW + 3600), SOURCE, NOW)
    n.store.put(_rec(Identity.generate(), key, 1, NOW + 10), SOURCE, NOW)
    n.legacy.put(b"L" * 20, b"plain", NOW)
    return n


async def test_round_trip_restores_contacts_records_and_legacy_values(
    dht: StartDht, tmp_path: Path
) -> None:
    """A node restarted with the same ID from its state file has the same contacts
    (IDs and addresses), the records it held (still verifiable, and served again) and
    the stock nodes' plain values."""
    nodes = await dht(6)
    node, writer = nodes[0], nodes[2]
    key = records.data_key("state-round-trip")
    sent = [
        records.sign(Identity.generate(), RecordType.DATA, key, b"x", seq=3, expires=e)
        for e in (writer.wallclock() + 600, writer.wallclock() + 900)
    ]
    await writer.put(sent)
    assert node.address is not None
    plain = {os.urandom(20): b"bytes value", os.urandom(20): "text", os.urandom(20): 42}
    for k, v in plain.items():
        ok = await asyncio.wait_for(writer.request(node.address, "store", [writer.id, k, v]), STEP)
        assert ok is True
    now = node.wallclock()
    held = sorted(r.raw for r in node.store.get(key, now))
    assert held == sorted(r.raw for r in sent), "precondition: the node stores the records"
    assert len(node.table) == 5

    data_dir = tmp_path / "not" / "yet" / "there"
    node.save_state(data_dir)
    assert sorted(p.name for p in data_dir.iterdir()) == [STATE_FILE]  # no temporary left

    restored = DhtNode(node.id, node.config)
    try:
        assert restored.load_state(data_dir) == 2
        assert _contacts(restored) == _contacts(node)
        raws = sorted(r.raw for r in restored.store.get(key, restored.wallclock()))
        assert raws == held
        for raw in raws:
            records.validate(records.decode(raw), restored.wallclock())
        assert dict(restored.legacy.items(restored.wallclock())) == plain

        # Back on the network, it serves the records again.
        addr = await restored.listen_udp("127.0.0.1", 0)
        # Its answer validates the asker's address there (issue 10): a full page, not 3x.
        assert nodes[3].address is not None
        await asyncio.wait_for(restored.ping(nodes[3].address), STEP)
        reply = await asyncio.wait_for(
            nodes[3].request(addr, "ds_find_value", nodes[3].ds_args(key, 0)), STEP
        )
        assert sorted(reply[1]) == held
    finally:
        await restored.close()


def test_load_drops_records_that_expired_while_down(tmp_path: Path) -> None:
    """Records that expired between save and load are not restored; the rest are."""
    clock = Clock()
    node = _offline_node(clock)
    node.save_state(tmp_path)
    clock.now = NOW + 60

    restored = DhtNode(node.id, wallclock=clock)
    assert restored.load_state(tmp_path) == 1
    (rec,) = restored.store.get(records.data_key("offline"), clock.now)
    assert rec.expires == NOW + 3600
    assert _contacts(restored) == _contacts(node)


def test_missing_state_file_is_fine(tmp_path: Path) -> None:
    """A first start has no state file: nothing is restored, nothing raises."""
    n = DhtNode(os.urandom(20))
    assert n.load_state(tmp_path / "empty") == 0
    assert len(n.table) == 0 and len(n.store) == 0


def test_load_drops_legacy_values_that_expired_while_down(tmp_path: Path) -> None:
    clock = Clock()
    node = _offline_node(clock, NodeConfig(limits=StorageLimits(legacy_ttl=30.0)))
    node.save_state(tmp_path)
    clock.now = NOW + 60
    assert node.legacy.get(b"L" * 20, clock.now) is None  # the running node dropped it

    restored = DhtNode(node.id, node.config, wallclock=clock)
    restored.load_state(tmp_path)
    assert restored.legacy.get(b"L" * 20, clock.now) is None


def _truncated(path: Path) -> bytes:
    return path.read_bytes()[: path.stat().st_size // 2]


@pytest.mark.parametrize(
    ("damage", "words"),
    [
        (lambda p: b"", "unreadable"),
        (_truncated, "unreadable"),
        (lambda p: b"\xc1 this is not msgpack", "unreadable"),
        (lambda p: p.read_bytes() + b"\x00", "unreadable"),
        (lambda p: codec.pack({"v": 2, "contacts": []}), "unknown format"),
        (lambda p: codec.pack([1, 2, 3]), "unknown format"),
    ],
    ids=["empty", "truncated", "garbage", "trailing-byte", "future-version", "not-a-map"],
)
def test_damaged_state_file_is_a_usage_error_naming_it(
    tmp_path: Path, damage: Any, words: str
) -> None:
    """An empty, truncated, garbled or foreign state file raises :class:`UsageError`
    whose message names the file, and restores nothing."""
    _offline_node(Clock()).save_state(tmp_path)
    path = tmp_path / STATE_FILE
    path.write_bytes(damage(path))

    fresh = DhtNode(os.urandom(20), wallclock=Clock())
    with pytest.raises(UsageError, match=words) as err:
        fresh.load_state(tmp_path)
    assert str(path) in str(err.value)
    assert len(fresh.table) == 0 and len(fresh.store) == 0 and len(fresh.legacy) == 0


def _valid_raw() -> bytes:
    return _rec(Identity.generate(), records.data_key("shape"), 1, NOW + 600).raw


@pytest.mark.parametrize(
    "state",
    [
        pytest.param(lambda: {"v": 1, "contacts": 5}, id="contacts-int"),
        pytest.param(lambda: {"v": 1, "records": [[b"x"]]}, id="record-1"),
        pytest.param(
            lambda: {"v": 1, "records": [[_valid_raw(), ["127.0.0.1"]]]},
            id="record-source-short",
        ),
        pytest.param(lambda: {"v": 1, "legacy": 3}, id="legacy-int"),
        pytest.param(
            lambda: {"v": 1, "contacts": [[b"short", "x", -1]], "records": [[b"junk", ["h", 1]]]},
            id="invalid-entries-skipped",
        ),
    ],
)
def test_wrongly_shaped_state_is_a_usage_error(tmp_path: Path, state: Any) -> None:
    """A state file that decodes but whose entries have the wrong shape (a flipped bit, a
    hand edit) is a :class:`UsageError` naming the file, or its bad entries are skipped;
    never an uncaught TypeError/ValueError/IndexError."""
    path = tmp_path / STATE_FILE
    path.write_bytes(codec.pack(state()))
    fresh = DhtNode(os.urandom(20), wallclock=Clock())
    try:
        restored = fresh.load_state(tmp_path)
    except UsageError as exc:
        assert str(path) in str(exc)
    else:
        assert restored == 0 and len(fresh.table) == 0


def test_failed_save_leaves_the_previous_state(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The write is atomic: a save that fails midway leaves the previous file whole."""
    clock = Clock()
    node = _offline_node(clock)
    node.save_state(tmp_path)
    before = (tmp_path / STATE_FILE).read_bytes()
    node.store.put(_rec(Identity.generate(), records.data_key("later"), 1, NOW + 600), SOURCE, NOW)

    def fail(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(OSError, match="No space"):
        node.save_state(tmp_path)
    monkeypatch.undo()
    assert (tmp_path / STATE_FILE).read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [STATE_FILE]  # the temporary is gone
    assert DhtNode(node.id, wallclock=clock).load_state(tmp_path) == 2


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_identity_key_file_is_private_and_stable(tmp_path: Path) -> None:
    """``load_or_create`` creates the directory (0700) and a 0600 key file; loading again
    gives the same key."""
    data_dir = tmp_path / "data"
    first = Identity.load_or_create(data_dir)
    key_file = data_dir / KEY_FILE
    assert _mode(key_file) == 0o600
    assert _mode(data_dir) == 0o700
    assert len(key_file.read_bytes()) == KEY_FILE_SIZE
    assert sorted(p.name for p in data_dir.iterdir()) == [KEY_FILE]
    again = Identity.load_or_create(data_dir)
    assert again.public_key == first.public_key
    assert again.self_id == first.self_id
    assert again.x25519_public == first.x25519_public


def test_identity_key_file_with_loose_mode_is_fixed_on_load(tmp_path: Path) -> None:
    first = Identity.load_or_create(tmp_path)
    key_file = tmp_path / KEY_FILE
    key_file.chmod(0o644)
    again = Identity.load_or_create(tmp_path)
    assert _mode(key_file) == 0o600
    assert again.public_key == first.public_key


def test_identity_key_file_of_wrong_size_is_a_usage_error(tmp_path: Path) -> None:
    key_file = tmp_path / KEY_FILE
    key_file.write_bytes(b"\x01" * 31)
    with pytest.raises(UsageError) as err:
        Identity.load_or_create(tmp_path)
    assert str(key_file) in str(err.value)
    assert key_file.read_bytes() == b"\x01" * 31  # never overwritten


def test_new_identity_key_file_is_private_even_over_a_stale_temporary(tmp_path: Path) -> None:
    stale = tmp_path / "identity.tmp"
    stale.write_bytes(b"left over")
    stale.chmod(0o644)
    Identity.load_or_create(tmp_path)
    assert _mode(tmp_path / KEY_FILE) == 0o600
