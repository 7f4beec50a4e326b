"""Channel binding: the key that signed the descriptions is the key at the other end of
the DTLS connection (the unknown key-share of RFC 8844 is caught).

The splice runs on real UDP sockets and real aiortc connections on 127.0.0.1; mallory
is a :class:`Peer` whose inbox handler re-seals what it receives, built from the
library's own inbox and delivery code.
"""

from __future__ import annotations

import asyncio
import os
from typing import TYPE_CHECKING

import pytest

from dhtsignal.dht.records import Record
from dhtsignal.errors import BindingFailed
from dhtsignal.identity import Identity
from dhtsignal.peer import IncomingFailed, Peer, PeerEvent, Session
from dhtsignal.presence import PeerInfo, resolve
from dhtsignal.signaling import binding
from dhtsignal.signaling.envelope import MessageType
from dhtsignal.signaling.inbox import AnswerReceived, OfferReceived

if TYPE_CHECKING:
    from conftest import StartDht, StartPeer

STEP = 10.0


@pytest.fixture
async def boot(dht: StartDht) -> list[str]:
    nodes = await dht(3)
    assert nodes[0].address is not None
    host, port = nodes[0].address
    return [f"{host}:{port}"]


def test_binding_verifies_only_for_the_mirrored_view() -> None:
    alice, bob, mallory = Identity.generate(), Identity.generate(), Identity.generate()
    sid, fa, fb = os.urandom(8), os.urandom(32), os.urandom(32)
    sig = binding.sign(alice, bob.public_key, sid, fa, fb)
    # Bob sees his own certificate as local and alice's as remote.
    assert binding.check(bob.public_key, alice.public_key, sid, fb, fa, sig)
    # Under the key bob thinks he accepted (mallory's), alice's signature fails.
    assert not binding.check(bob.public_key, mallory.public_key, sid, fb, fa, sig)
    # Signed for mallory as the peer: fails at bob even under alice's key.
    sig_m = binding.sign(alice, mallory.public_key, sid, fa, fb)
    assert not binding.check(bob.public_key, alice.public_key, sid, fb, fa, sig_m)
    # Another certificate, another session, a reflected message, a short signature.
    assert not binding.check(bob.public_key, alice.public_key, sid, os.urandom(32), fa, sig)
    assert not binding.check(bob.public_key, alice.public_key, os.urandom(8), fb, fa, sig)
    assert not binding.check(alice.public_key, alice.public_key, sid, fa, fb, sig)
    assert not binding.check(bob.public_key, alice.public_key, sid, fb, fa, sig[:63])


class Mallory(Peer):
    """Re-seals alice's offer (sent to mallory) to bob under mallory's own key, and bob's
    answer (sent to mallory) back to alice: every envelope it sends is genuinely its own."""

    victim: PeerInfo | None = None
    relayed: list[MessageType]
    callers: dict[bytes, OfferReceived]

    def _on_record(self, rec: Record) -> None:
        outcome = self.inbox.receive(rec, self.node.wallclock())
        now = self.node.wallclock()
        if isinstance(outcome, OfferReceived) and self.victim is not None:
            bob = self.victim
            self.callers[outcome.session_id] = outcome
            self.inbox.expect(outcome.session_id, bob.public_key)
            out = self.inbox.seal_offer(
                bob.public_key,
                bob.x25519,
                outcome.session_id,
                outcome.sdp,
                label=self.node_id or "",
                dht=self._my_addrs(),
                channel=outcome.channel,
                now=now,
            )
            self._deliver(out, MessageType.OFFER, bob.addresses)
            self.relayed.append(MessageType.OFFER)
        elif isinstance(outcome, AnswerReceived):
            caller = self.callers[outcome.session_id]
            out = self.inbox.seal_answer(
                caller.sender, caller.x25519, outcome.session_id, outcome.sdp, now
            )
            self._deliver(out, MessageType.ANSWER, caller.dht)
            self.relayed.append(MessageType.ANSWER)


async def test_spliced_session_fails_the_binding_on_both_sides(
    peers: StartPeer, boot: list[str]
) -> None:
    bob_failed: asyncio.Future[IncomingFailed] = asyncio.get_running_loop().create_future()

    def observe(event: PeerEvent) -> None:
        if isinstance(event, IncomingFailed) and not bob_failed.done():
            bob_failed.set_result(event)

    bob = await peers("bob", boot, observer=observe)
    alice = await peers("alice", boot)
    mal = Mallory("mallory", boot)
    mal.relayed, mal.callers = [], {}
    # The factory closes what it started; mallory is started by hand and closed below.
    try:
        await mal.start()
        mal.victim = await asyncio.wait_for(resolve(mal.node, "bob", mal.known), STEP)

        with pytest.raises(BindingFailed) as caught:
            await asyncio.wait_for(alice.connect("mallory"), STEP)
        assert caught.value.reason == "binding-failed"
        assert "mallory" in str(caught.value) and "spliced" in str(caught.value)

        failed = await asyncio.wait_for(bob_failed, STEP)
        assert isinstance(failed.error, BindingFailed)
        # Bob believed he was talking to mallory: the key he accepted.
        assert failed.remote_key == mal.public_key
        assert mal.relayed == [MessageType.OFFER, MessageType.ANSWER]
        assert alice.stats["closed:binding-failed"] == 1
        assert bob.stats["closed:binding-failed"] == 1
        # Nothing reached either application: no session was handed out.
        assert bob._incoming.empty()
        assert not alice._sessions and not bob._sessions
    finally:
        await mal.close()


async def test_honest_session_is_bound_and_carries_data(peers: StartPeer, boot: list[str]) -> None:
    bob = await peers("bob", boot)
    alice = await peers("alice", boot)
    session = await asyncio.wait_for(alice.connect("bob"), STEP)
    incoming = await asyncio.wait_for(anext(aiter(bob.incoming())), STEP)
    assert isinstance(incoming, Session)
    assert incoming.remote_key == alice.public_key
    await session.send(b"hi")
    assert await incoming.recv(STEP) == b"hi"
    assert alice.stats["closed:binding-failed"] == bob.stats["closed:binding-failed"] == 0
    # Both sides saw the same two certificates, in mirrored order.
    assert session._fingerprints is not None and incoming._fingerprints is not None
    assert session._fingerprints == incoming._fingerprints[::-1]
