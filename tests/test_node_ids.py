"""Who owns a node ID: the claimant most storing nodes hold, never the oldest self-written
claim time. Real UDP nodes on 127.0.0.1 for the network case."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from dhtsignal.aio.node import DhtNode
from dhtsignal.datadir import KnownPeers
from dhtsignal.dht import records
from dhtsignal.dht.records import RecordType, node_key
from dhtsignal.errors import NodeIdTaken, PinnedKeyChanged
from dhtsignal.identity import Identity
from dhtsignal.presence import Presence, resolve
from dhtsignal.signaling.presence import owner
from dhtsignal.wire import codec

if TYPE_CHECKING:
    from conftest import StartDht

NOW = 1_700_000_000.0


def _near(key: bytes, i: int) -> bytes:
    """A node ID that differs from ``key`` only in its last byte: closer than any random ID."""
    return key[:-1] + bytes([key[-1] ^ (i + 1)])


async def test_a_backdated_claim_on_a_minority_of_storing_nodes_does_not_win(
    dht: StartDht,
) -> None:
    """Mallory backdates her claim to 1970 and gets it onto the two storing nodes that
    joined after alice published (they hold nothing of alice's yet). Readers still find
    alice: six storing nodes hold her claim against mallory's two."""
    key = node_key("alice")
    nodes = await dht(12)
    alice, mallory = Identity.generate(), Identity.generate()
    await Presence(nodes[1], alice, "alice").publish()
    first = [n for n in nodes if n.store.get(key, n.wallclock())]
    assert len(first) >= 8  # eight storing nodes, and the publisher if it is one of the closest

    # Two nodes join right next to the key: they become storing nodes, holding nothing.
    late = await _join_near(dht, nodes[0], key)
    squatter = Presence(nodes[2], mallory, "alice")
    squatter.claimed_at = 0.0  # "claimed in 1970"
    with pytest.raises(NodeIdTaken):
        await squatter.publish()  # the six that hold alice's claim refuse it...
    for n in late:  # ...the two new storing nodes took it
        assert {r.signer for r in n.store.get(key, n.wallclock())} == {mallory.public_key}

    reader = nodes[-1]
    held = await reader.get_held(key, include_tombstones=True)
    assert held.support[mallory.public_key] == 2
    assert held.support[alice.public_key] >= 6
    ts = {r.signer: r.fields()["t"] for r in held.records if r.type == RecordType.CLAIM}
    assert ts[mallory.public_key] < ts[alice.public_key]  # the old rule would pick mallory

    info = await resolve(reader, "alice")
    assert info.public_key == alice.public_key


async def _join_near(dht: StartDht, via: DhtNode, key: bytes) -> list[DhtNode]:
    class Near(DhtNode):
        made = 0

        def __init__(self, _node_id: bytes, config: object = None) -> None:
            Near.made += 1
            super().__init__(_near(key, Near.made), config)  # type: ignore[arg-type]

    assert via.address is not None
    return await dht(2, node_class=Near, join=via.address)


# -- the rule itself --------------------------------------------------------------------------


def _claim(who: Identity, t: float) -> records.Record:
    return records.sign(
        who,
        RecordType.CLAIM,
        node_key("alice"),
        codec.pack({"id": "alice", "t": t}),
        seq=1,
        expires=NOW + 600,
    )


ALICE = Identity(bytes(range(32)))
MALLORY = Identity(bytes(range(1, 33)))


def test_most_storing_nodes_beats_the_oldest_claim_time() -> None:
    recs = [_claim(ALICE, NOW), _claim(MALLORY, 0.0)]
    support = {ALICE.public_key: 5, MALLORY.public_key: 3}
    assert owner("alice", recs, support, None) == ALICE.public_key


def test_the_claim_time_breaks_a_tie() -> None:
    recs = [_claim(ALICE, NOW), _claim(MALLORY, NOW - 1)]
    support = {ALICE.public_key: 4, MALLORY.public_key: 4}
    assert owner("alice", recs, support, None) == MALLORY.public_key
    assert owner("alice", recs, {}, None) == MALLORY.public_key


def test_a_pin_overrides_the_count_and_a_changed_pin_names_the_majority(tmp_path: Path) -> None:
    known = KnownPeers(tmp_path / "known_peers")
    known.pin("alice", MALLORY.public_key.hex())
    recs = [_claim(ALICE, NOW), _claim(MALLORY, NOW)]
    support = {ALICE.public_key: 7, MALLORY.public_key: 1}
    assert owner("alice", recs, support, known) == MALLORY.public_key
    with pytest.raises(PinnedKeyChanged) as exc:
        owner("alice", recs[:1], support, known)
    assert exc.value.seen == ALICE.public_key.hex()
