"""Sybil attacks on names in the simulator: how many /24 prefixes an attacker needs.

Theory of operation
-------------------
:class:`SybilNet` is a :class:`~dhtsignal.testing.simnet.SimNetwork` whose honest nodes
each sit in their own /24 (``10.a.b.1``) and whose attacker nodes sit in the /24s the
attacker holds (``11.x.y.j``, any number of addresses and ports in each). Every node runs
the real sans-I/O :class:`~dhtsignal.dht.node.Node`; diversity limits are switched on
for these (private) addresses.

One trial (:meth:`SybilNet.trial`) of an attacker holding ``prefixes`` /24s:

1. the attacker's nodes join with routing IDs chosen right next to the key of a fresh
   label (``per_prefix`` of them in each prefix, so they are the closest nodes of the
   whole network to it), each already holding the attacker's claim on the label, with
   a claim time of 1970: they answer ``id-taken`` to the owner and serve the attacker's
   claim to readers;
2. the owner, a random honest node, claims the label (a put of its CLAIM record);
3. a random honest reader, with no pin, reads the label's key and picks its owner the
   way :func:`~dhtsignal.signaling.presence.owner` does.

The attacker wins the trial if the owner's claim failed (``NodeIdTaken``) or the reader
picked another key. The attacker's nodes then crash (they stay in routing tables as
dead contacts until evicted, as after any crash).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

from dhtsignal.dht import records
from dhtsignal.dht.node import Node
from dhtsignal.dht.params import NodeConfig
from dhtsignal.dht.records import RecordType, node_key
from dhtsignal.errors import NodeIdTaken
from dhtsignal.identity import Identity
from dhtsignal.signaling.presence import owner
from dhtsignal.testing.simnet import SimConfig, SimNetwork
from dhtsignal.wire import codec
from dhtsignal.wire.addr import Addr


@dataclass
class Outcome:
    """One trial."""

    blocked: bool
    """The owner's claim failed with ``NodeIdTaken``."""
    taken: bool
    """The reader resolved the label to the attacker's key."""
    unresolved: bool
    """The reader found no claim at all."""

    @property
    def attacker_won(self) -> bool:
        return self.blocked or self.taken


class SybilNet(SimNetwork):
    """Honest nodes in their own /24 each; attacker nodes in the attacker's /24s."""

    def __init__(self, config: SimConfig | None = None) -> None:
        super().__init__(config)
        self._next_addr: Addr | None = None
        self._prefixes_used = 0
        self.trials = 0

    def address_of(self, index: int) -> Addr:
        if self._next_addr is not None:
            addr, self._next_addr = self._next_addr, None
            return addr
        n = index + 1
        return (f"10.{(n >> 8) & 0xFF}.{n & 0xFF}.1", 20000 + (n >> 16))

    def _sybil(self, node_id: bytes, addr: Addr) -> Node:
        self._next_addr = addr
        return self.add_node(node_id)

    def trial(self, prefixes: int, per_prefix: int = 2) -> Outcome:
        """One attack by ``prefixes`` /24s with ``per_prefix`` nodes in each."""
        self.trials += 1
        label = f"victim-{self.trials}"
        key = node_key(label)
        mallory, alice = Identity.generate(), Identity.generate()
        wall = self.wallclock()
        squat = records.sign(
            mallory,
            RecordType.CLAIM,
            key,
            codec.pack({"id": label, "t": 0.0}),
            seq=1,
            expires=wall + 3600,
        )
        honest = [i for i in self.joined if self.alive[i]]
        sybils: list[Node] = []
        target = int.from_bytes(key, "big")
        ops = []
        for p in range(prefixes):
            self._prefixes_used += 1
            c = self._prefixes_used
            for j in range(per_prefix):
                nid = (target ^ (p * per_prefix + j + 1)).to_bytes(20, "big")
                addr = (f"{11 + (c >> 16)}.{(c >> 8) & 0xFF}.{c & 0xFF}.{j + 1}", 40000 + j)
                node = self._sybil(nid, addr)
                node.store.put(squat, addr, wall)
                sybils.append(node)
                via = self.nodes[self.rng.choice(honest)].address
                assert via is not None
                ops.append(self.start(node, _bootstrap_via(via)))
        self.wait(ops)
        owner_node = self.nodes[self.rng.choice(honest)]
        claim = records.sign(
            alice,
            RecordType.CLAIM,
            key,
            codec.pack({"id": label, "t": self.wallclock()}),
            seq=1,
            expires=self.wallclock() + 3600,
        )
        blocked = False
        try:
            self.put(owner_node, [claim])
        except NodeIdTaken:
            blocked = True
        reader = self.nodes[self.rng.choice(honest)]
        cfg = reader.config
        held = self.get_held(reader, key, include_tombstones=True, k=cfg.name_replicas)
        who = owner(label, held.records, held.support, None)
        for node in sybils:
            self.crash(node)
        return Outcome(blocked, who is not None and who != alice.public_key, who is None)


def _bootstrap_via(via: Addr) -> Callable[[Node, float], int]:
    def begin(node: Node, now: float) -> int:
        return node.start_bootstrap([via], now)

    return begin


def network(honest: int, node_config: NodeConfig, seed: int = 1) -> SybilNet:
    """A :class:`SybilNet` of ``honest`` joined honest nodes."""
    cfg = SimConfig(seed=seed, node_config=dataclasses.replace(node_config))
    net = SybilNet(cfg)
    net.grow(honest)
    return net


#: Today's lookups, for comparison: no diversity limit, eight storing nodes per name.
BASELINE = NodeConfig(max_per_prefix=0, name_replicas=8)
#: The defence: one place per prefix among the closest (on the simulator's private
#: addresses too), 33 storing nodes per name.
DEFENDED = NodeConfig(diversity_on_private=True)


def success_rate(net: SybilNet, prefixes: int, trials: int, per_prefix: int = 2) -> float:
    """The fraction of ``trials`` the attacker with ``prefixes`` /24s won."""
    won = sum(net.trial(prefixes, per_prefix).attacker_won for _ in range(trials))
    return won / trials
