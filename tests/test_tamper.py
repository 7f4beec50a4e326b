"""A hostile DHT node in the signaling path: what it alters, forges or replays is refused.

Topology: one DHT node, :class:`HostileNode`, is the only storing node; alice and bob are
client-mode peers joined through it, and their direct ``ds_notify`` push is switched off
(as when a callee's advertised address is unreachable). Every offer and answer therefore
travels through the hostile node, which stores and relays honestly but shows the test each
INBOX record it is asked to store, *before* storing it. The test's forgeries are pushed to
the victim from the hostile node's socket ahead of the genuine record, so they are handled
first; the victim must refuse each with the right reason and still open the honest session.
"""

from __future__ import annotations

import asyncio
import os
import re
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pytest
from aiortc import RTCSessionDescription

from dhtsignal.aio import rtc
from dhtsignal.aio.node import DhtNode
from dhtsignal.dht import records
from dhtsignal.dht.params import NodeConfig
from dhtsignal.dht.records import Record, RecordType, inbox_key
from dhtsignal.errors import DialFailed, RecordRejected
from dhtsignal.identity import Identity
from dhtsignal.peer import Peer, PeerConfig, PeerEvent, Session, SignalReceived
from dhtsignal.signaling import envelope, sdp
from dhtsignal.signaling.envelope import MessageType
from dhtsignal.signaling.session import SessionTimeouts
from dhtsignal.wire import codec

if TYPE_CHECKING:
    from conftest import StartDht, StartPeer

STEP = 10.0
#: Envelope layout (see dhtsignal.signaling.envelope): the sender key ends the signed
#: associated data; the ciphertext follows the header; the signature ends the envelope.
SENDER = slice(envelope.AAD_END - 32, envelope.AAD_END)
CIPHERTEXT = envelope.HEADER.size
INBOX_TTL = 60.0


class HostileNode(DhtNode):
    """A storing node that shows every INBOX record to ``before_store`` first, can push
    arbitrary records to a peer's inbox, and says when a peer subscribed to a key."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.inbox_stores: list[Record] = []
        self.before_store: Callable[[Record], None] | None = None
        self.subscribed: defaultdict[bytes, asyncio.Event] = defaultdict(asyncio.Event)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        try:
            msg = codec.decode(data)
        except codec.MalformedDatagram:
            msg = None
        stores = {"ds_store": 4, "ds_store_find": 5}  # the batch is the last argument
        if isinstance(msg, codec.Request) and stores.get(msg.name) == len(msg.args):
            for raw in msg.args[-1] if isinstance(msg.args[-1], list) else []:
                try:
                    rec = records.decode(raw)
                except RecordRejected:
                    continue
                if rec.type == RecordType.INBOX:
                    self.inbox_stores.append(rec)
                    if self.before_store is not None:
                        self.before_store(rec)
        super().datagram_received(data, addr)
        if isinstance(msg, codec.Request) and msg.name == "ds_listen" and len(msg.args) == 5:
            self.subscribed[msg.args[3]].set()

    def push(self, victim: Peer, raw: bytes, key: bytes | None = None) -> asyncio.Future[Any]:
        """Send ``raw`` to the victim's DHT node as a notification for its inbox (now)."""
        assert victim.node.address is not None
        key = key or inbox_key(victim.public_key)
        return self.request(victim.node.address, "ds_notify", self.ds_args(key, [raw]))


class InboxProbe:
    """A peer's ``observer``: tells when the peer has handled a given inbox record."""

    def __init__(self) -> None:
        self.handled: list[bytes] = []
        self._waiters: dict[bytes, asyncio.Future[None]] = {}

    def __call__(self, event: PeerEvent) -> None:
        if not isinstance(event, SignalReceived):
            return
        raw = event.record.raw
        self.handled.append(raw)
        fut = self._waiters.get(raw)
        if fut is not None and not fut.done():
            fut.set_result(None)

    async def wait(self, raw: bytes, timeout: float = STEP) -> None:
        if raw in self.handled:
            return
        fut = self._waiters.setdefault(raw, asyncio.get_running_loop().create_future())
        await asyncio.wait_for(fut, timeout)


class RewrittenOffer(rtc.PeerConnection):
    """A connection whose local offer, as the peer reads it, is passed through ``rewrite``."""

    rewrite: Callable[[str], str] | None = None

    @property
    def localDescription(self) -> RTCSessionDescription:
        desc = super().localDescription
        if self.rewrite is None or desc.type != "offer":
            return desc
        return RTCSessionDescription(sdp=self.rewrite(desc.sdp), type=desc.type)


@dataclass
class OfferRewriter:
    """A ``connection_factory`` whose connections rewrite their offers with ``rewrite``."""

    rewrite: Callable[[str], str] | None = None

    def __call__(self, ice_servers: Any) -> rtc.PeerConnection:
        rtc.limit_ice_retransmissions()
        pc = RewrittenOffer(rtc.rtc_configuration(ice_servers))
        pc.rewrite = self.rewrite
        return pc


@dataclass
class Net:
    hostile: HostileNode
    alice: Peer
    bob: Peer
    mallory: Identity
    """The attacker's key (the hostile node's operator)."""
    carol: Identity
    """A third party that is not online."""
    bob_inbox: InboxProbe
    """Every inbox record bob handled, in order."""
    alice_offers: OfferRewriter
    """alice's connection factory: set its ``rewrite`` to alter her next offers."""

    def offers(self) -> list[Record]:
        return [r for r in self.hostile.inbox_stores if _msg_type(r) == MessageType.OFFER]

    def answers(self) -> list[Record]:
        return [r for r in self.hostile.inbox_stores if _msg_type(r) == MessageType.ANSWER]


#: No direct ``ds_notify`` push: every envelope goes through the DHT's storing nodes.
NO_DIRECT_PUSH = PeerConfig(direct_push_addrs=0)


@pytest.fixture
async def net(dht: StartDht, peers: StartPeer) -> Net:
    (hostile,) = await dht(1, node_class=HostileNode)
    assert isinstance(hostile, HostileNode) and hostile.address is not None
    client = NodeConfig(client_mode=True)
    fast = SessionTimeouts(answer=3.0)
    rewriter = OfferRewriter()
    alice = await peers(
        "alice",
        [hostile.address],
        node_config=client,
        timeouts=fast,
        config=NO_DIRECT_PUSH,
        connection_factory=rewriter,
    )
    probe = InboxProbe()
    bob = await peers(
        "bob",
        [hostile.address],
        node_config=client,
        timeouts=fast,
        config=NO_DIRECT_PUSH,
        observer=probe,
    )
    for p in (alice, bob):  # offers and answers reach them only through the hostile node
        await asyncio.wait_for(hostile.subscribed[inbox_key(p.public_key)].wait(), STEP)
    return Net(hostile, alice, bob, Identity.generate(), Identity.generate(), probe, rewriter)


# -- forging helpers -----------------------------------------------------------------------


def _msg_type(rec: Record) -> int:
    return rec.sub[-1] if len(rec.sub) == envelope.SESSION_ID_SIZE + 1 else -1


def inbox_record(signer: Identity, key: bytes, blob: bytes, sub: bytes, seq: int = 0) -> Record:
    """An INBOX record as a peer would write it, signed by ``signer``."""
    now = _now()
    return records.sign(
        signer,
        RecordType.INBOX,
        key,
        blob,
        seq=seq or int(now * 1000),
        expires=now + INBOX_TTL,
        sub=sub,
    )


def _now() -> float:
    return time.time()  # the peers' wall clock (DhtNode.wallclock)


def flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1 :]


def with_sender(blob: bytes, key: bytes) -> bytes:
    return blob[: SENDER.start] + key + blob[SENDER.stop :]


def resign_envelope(blob: bytes, signer: Identity, recipient_key: bytes) -> bytes:
    """Replace the envelope's signature with ``signer``'s over the (changed) content."""
    signed = blob[: -envelope.SIGNATURE_SIZE]
    return signed + signer.sign(envelope.DOMAIN + recipient_key + signed)


def own_envelope(
    sender: Identity, to: Identity | Peer, session_id: bytes, sealed_at: float | None = None
) -> bytes:
    """A correctly sealed offer envelope from ``sender`` (its body a plausible offer)."""
    body = codec.pack({"sdp": b"\x01", "x": sender.x25519_public, "id": "", "dht": []})
    x = to.identity.x25519_public if isinstance(to, Peer) else to.x25519_public
    key = to.public_key
    return envelope.seal(
        sender,
        key,
        x,
        session_id,
        MessageType.OFFER,
        body,
        _now() if sealed_at is None else sealed_at,
    )


# A forgery: (net, the genuine record it is built from) -> (raw record, key to push it under).
Forge = Callable[[Net, Record], tuple[bytes, bytes]]


def relayed(net: Net, rec: Record) -> tuple[bytes, bytes]:
    """The genuine envelope, unaltered, in a record the attacker signed."""
    return inbox_record(net.mallory, rec.key, rec.payload, rec.sub).raw, rec.key


def altered(net: Net, rec: Record) -> tuple[bytes, bytes]:
    """One ciphertext byte flipped; the outer record re-signed by the attacker."""
    blob = flip(rec.payload, CIPHERTEXT + 3)
    return inbox_record(net.mallory, rec.key, blob, rec.sub).raw, rec.key


def altered_and_claimed(net: Net, rec: Record) -> tuple[bytes, bytes]:
    """One ciphertext byte flipped and the sender key replaced by the attacker's, so the
    record and envelope name the same signer; the envelope signature is alice's."""
    blob = with_sender(flip(rec.payload, CIPHERTEXT + 3), net.mallory.public_key)
    return inbox_record(net.mallory, rec.key, blob, rec.sub).raw, rec.key


def altered_in_transit(net: Net, rec: Record) -> tuple[bytes, bytes]:
    """One byte of the genuine record's payload flipped, nothing re-signed."""
    at = rec.raw.index(rec.payload) + CIPHERTEXT + 3
    return flip(rec.raw, at), rec.key


def rebound(net: Net, rec: Record) -> tuple[bytes, bytes]:
    """alice's ciphertext under the attacker's sender key and envelope signature."""
    blob = resign_envelope(
        with_sender(rec.payload, net.mallory.public_key), net.mallory, net.bob.public_key
    )
    return inbox_record(net.mallory, rec.key, blob, rec.sub).raw, rec.key


def forged_envelope_as_alice(net: Net, rec: Record) -> tuple[bytes, bytes]:
    """The attacker's own offer with alice's key as sender, in the attacker's record."""
    blob = with_sender(own_envelope(net.mallory, net.bob, os.urandom(8)), net.alice.public_key)
    return inbox_record(net.mallory, rec.key, blob, blob[2:10] + b"\x01").raw, rec.key


def forged_record_as_alice(net: Net, rec: Record) -> tuple[bytes, bytes]:
    """A record that names alice as its signer, signed by the attacker."""
    blob = with_sender(own_envelope(net.mallory, net.bob, os.urandom(8)), net.alice.public_key)
    fake = inbox_record(net.mallory, rec.key, blob, blob[2:10] + b"\x01")
    fields = codec.unpack(fake.raw)
    fields[4] = net.alice.public_key  # [version, network, rtype, key, signer, ...]
    return codec.pack(fields), rec.key


def misaddressed(net: Net, rec: Record) -> tuple[bytes, bytes]:
    """The attacker's envelope for carol, in a record under bob's inbox key."""
    blob = own_envelope(net.mallory, net.carol, os.urandom(8))
    return inbox_record(net.mallory, rec.key, blob, blob[2:10] + b"\x01").raw, rec.key


def misaddressed_record(net: Net, rec: Record) -> tuple[bytes, bytes]:
    """A record under carol's inbox key, pushed as a notification for bob's inbox."""
    blob = own_envelope(net.mallory, net.carol, os.urandom(8))
    carol_inbox = inbox_key(net.carol.public_key)
    return inbox_record(net.mallory, carol_inbox, blob, blob[2:10] + b"\x01").raw, rec.key


def stale(net: Net, rec: Record) -> tuple[bytes, bytes]:
    """The attacker's own offer, sealed two minutes ago."""
    blob = own_envelope(net.mallory, net.bob, os.urandom(8), sealed_at=_now() - 120)
    return inbox_record(net.mallory, rec.key, blob, blob[2:10] + b"\x01").raw, rec.key


def truncated(net: Net, rec: Record) -> tuple[bytes, bytes]:
    """The attacker's own offer cut short."""
    blob = own_envelope(net.mallory, net.bob, os.urandom(8))[:120]
    return inbox_record(net.mallory, rec.key, blob, blob[2:10] + b"\x01").raw, rec.key


# (forgery, where the refusal is counted: "peer" stats or its DHT "node" stats, reason)
FORGERIES: dict[str, tuple[Forge, str, str]] = {
    "relayed": (relayed, "peer", "refused:signer-mismatch"),
    "altered": (altered, "peer", "refused:signer-mismatch"),
    "altered-and-claimed": (altered_and_claimed, "peer", "refused:bad-signature"),
    "altered-in-transit": (altered_in_transit, "node", "refused:bad-signature"),
    "rebound": (rebound, "peer", "refused:decrypt-failed"),
    "forged-envelope-as-alice": (forged_envelope_as_alice, "peer", "refused:signer-mismatch"),
    "forged-record-as-alice": (forged_record_as_alice, "node", "refused:bad-signature"),
    "misaddressed": (misaddressed, "peer", "refused:wrong-recipient"),
    "misaddressed-record": (misaddressed_record, "node", "refused:wrong-key"),
    "stale": (stale, "peer", "refused:stale"),
    "truncated": (truncated, "peer", "refused:malformed"),
}


def refusals(peer: Peer) -> dict[str, int]:
    return {k: v for k, v in peer.stats.items() if k.startswith("refused:") and v}


async def open_session(net: Net) -> tuple[Session, Session]:
    """alice dials bob; both ends carry a message each way."""
    out = await asyncio.wait_for(net.alice.connect("bob"), STEP)
    inc = await asyncio.wait_for(anext(net.bob.incoming()), STEP)
    assert inc.session_id == out.session_id and inc.remote_key == net.alice.public_key
    await out.send(b"ping")
    assert await inc.recv(STEP) == b"ping"
    await inc.send(b"pong")
    assert await out.recv(STEP) == b"pong"
    return out, inc


@pytest.mark.timeout(20)
@pytest.mark.parametrize("name", sorted(FORGERIES))
async def test_forged_offer_ahead_of_the_real_one_is_refused(net: Net, name: str) -> None:
    """As alice's offer passes through, the hostile node pushes one forgery built from it to
    bob first: bob counts the refusal under its reason and the honest session opens."""
    forge, counted_by, reason = FORGERIES[name]
    pushed: list[asyncio.Future[Any]] = []

    def before_store(rec: Record) -> None:
        if (
            not pushed
            and _msg_type(rec) == MessageType.OFFER
            and rec.signer == net.alice.public_key
        ):
            raw, key = forge(net, rec)
            pushed.append(net.hostile.push(net.bob, raw, key))

    net.hostile.before_store = before_store
    await open_session(net)
    assert len(pushed) == 1
    assert await asyncio.wait_for(pushed[0], STEP) is True
    # The forgery reached bob's node before the genuine offer, so by now it was handled.
    if counted_by == "peer":
        assert refusals(net.bob) == {reason: 1}, net.bob.stats
    else:
        assert net.bob.node.stats[reason] == 1, net.bob.node.stats
        assert refusals(net.bob) == {}, net.bob.stats
    assert net.bob._pending_incoming == 0 and net.bob._incoming.empty()
    assert len(net.offers()) == 1 and len(net.answers()) == 1


@pytest.mark.timeout(20)
async def test_relayed_answer_ahead_of_the_real_one_is_refused(net: Net) -> None:
    """The same attack on the answer: alice must still take bob's genuine answer."""
    pushed: list[asyncio.Future[Any]] = []

    def before_store(rec: Record) -> None:
        if not pushed and _msg_type(rec) == MessageType.ANSWER and rec.signer == net.bob.public_key:
            raw, key = relayed(net, rec)
            pushed.append(net.hostile.push(net.alice, raw, key))

    net.hostile.before_store = before_store
    await open_session(net)
    assert len(pushed) == 1 and await asyncio.wait_for(pushed[0], STEP) is True
    assert refusals(net.alice) == {"refused:signer-mismatch": 1}, net.alice.stats
    assert refusals(net.bob) == {}


@pytest.mark.timeout(20)
async def test_replayed_offer_is_not_answered_again(net: Net) -> None:
    """After the session opened, the hostile node replays alice's offer three ways; bob
    answers none of them and the session is unaffected."""
    out, inc = await open_session(net)
    (offer,) = net.offers()
    probe = net.bob_inbox
    before = len(probe.handled)
    exact = offer.raw
    # The sender's own key cannot replay it either: a new record, the same envelope.
    resigned_by_alice = inbox_record(
        net.alice.identity, offer.key, offer.payload, offer.sub, seq=offer.seq + 1
    ).raw
    rewrapped = relayed(net, offer)[0]
    sentinel = truncated(net, offer)[0]
    replies = [net.hostile.push(net.bob, raw) for raw in (exact, resigned_by_alice, rewrapped)]
    replies.append(net.hostile.push(net.bob, sentinel))
    assert await asyncio.wait_for(asyncio.gather(*replies), STEP) == [True] * 4
    await probe.wait(sentinel)  # handled in arrival order: the replays came first

    # The byte-identical record never reaches the peer: DhtNode.listen drops a slot's
    # sequence number it has already yielded (and counts nothing).
    assert exact not in probe.handled[before:]
    assert probe.handled[before:] == [resigned_by_alice, rewrapped, sentinel]
    assert refusals(net.bob) == {
        "refused:replay": 1,
        "refused:signer-mismatch": 1,
        "refused:malformed": 1,
    }
    assert net.bob._pending_incoming == 0 and net.bob._incoming.empty()
    assert len(net.answers()) == 1
    await out.send("still here")
    assert await inc.recv(STEP) == "still here"


@pytest.mark.timeout(20)
async def test_inbox_records_fit_one_datagram(net: Net, peers: StartPeer) -> None:
    """Real offer, answer and reject records, with a 64-character node ID and partial
    reliability: each record is at most 1200 bytes, each RPC carrying one at most 1400."""
    long_id = "x" * 64
    hostile = net.hostile
    assert hostile.address is not None
    client = NodeConfig(client_mode=True)
    caller = await peers(long_id, [hostile.address], node_config=client, config=NO_DIRECT_PUSH)
    picky = await peers(
        "picky", [hostile.address], node_config=client, accept=["nobody"], config=NO_DIRECT_PUSH
    )
    for p in (caller, picky):
        await asyncio.wait_for(hostile.subscribed[inbox_key(p.public_key)].wait(), STEP)
    await asyncio.wait_for(caller.connect("bob", ordered=False, max_packet_life_time=65535), STEP)
    await asyncio.wait_for(anext(net.bob.incoming()), STEP)
    with pytest.raises(DialFailed) as refused:
        await asyncio.wait_for(caller.connect("picky"), STEP)
    assert refused.value.reason == "rejected"

    msg_types = {_msg_type(r) for r in hostile.inbox_stores}
    assert msg_types == {MessageType.OFFER, MessageType.ANSWER, MessageType.REJECT}
    for rec in hostile.inbox_stores:
        assert len(rec.raw) <= records.MAX_RECORD, (_msg_type(rec), len(rec.raw))
        assert len(rec.payload) <= records.MAX_RECORD - 128
        store = codec.encode_request(bytes(20), "ds_store", hostile.ds_args([rec.raw]))
        notify = codec.encode_request(bytes(20), "ds_notify", hostile.ds_args(rec.key, [rec.raw]))
        assert max(len(store), len(notify)) <= codec.MAX_DATAGRAM
    offer = max(
        (r for r in hostile.inbox_stores if _msg_type(r) == MessageType.OFFER),
        key=lambda r: len(r.raw),
    )
    # One host candidate here; each more costs about 40 bytes of the remaining room.
    assert len(offer.raw) < 800, len(offer.raw)


def with_candidates(text: str, n: int) -> str:
    """``text`` with its host candidate replaced by ``n`` IPv6 server-reflexive ones."""
    line = re.search(r"^a=candidate:\S+ 1 udp (\d+) \S+ (\d+) typ host(?=\r?$)", text, re.M)
    assert line is not None, text
    prio, port = line.group(1), line.group(2)
    many = "\r\n".join(
        f"a=candidate:{i:032x} 1 udp {prio} 2001:db8:ffff:ffff:ffff:ffff:ffff:{i:x} {port} "
        f"typ srflx raddr fd00:ffff:ffff:ffff:ffff:ffff:ffff:{i:x} rport {port}"
        for i in range(n)
    )
    return text.replace(line.group(0), many)


@pytest.mark.timeout(20)
async def test_largest_valid_compact_offer_fits_an_inbox_record(net: Net) -> None:
    pc = rtc.new_connection()
    rtc.open_channels(pc)
    try:
        text = await rtc.local_description(pc, offer=True)
    finally:
        await pc.close()
    # As many IPv6 srflx candidates as a description may list: far more than fit a record.
    n = sdp.MAX_CANDIDATES
    full = sdp.Description.parse(with_candidates(text, n), "offer")
    assert len(full.pack()) > sdp.MAX_BLOB
    sdp.expand(sdp.compact(with_candidates(text, n), "offer"))

    stored: asyncio.Future[Record] = asyncio.get_running_loop().create_future()

    def before_store(rec: Record) -> None:
        if _msg_type(rec) == MessageType.OFFER and not stored.done():
            stored.set_result(rec)

    net.hostile.before_store = before_store
    net.alice_offers.rewrite = lambda text: with_candidates(text, n)
    dialing = asyncio.ensure_future(net.alice.connect("bob"))
    try:
        racing: set[asyncio.Future[Any]] = {dialing, stored}
        done, _ = await asyncio.wait(racing, timeout=STEP, return_when="FIRST_COMPLETED")
        if dialing in done:
            dialing.result()  # raises what connect() raised
        assert stored in done, "the offer never reached the DHT"
        assert len(stored.result().raw) <= records.MAX_RECORD
    finally:
        dialing.cancel()
        await asyncio.gather(dialing, return_exceptions=True)
