"""The Peer/Session API end to end: a DHT on 127.0.0.1, real aiortc connections.

Every peer and DHT node here runs on real UDP sockets on loopback, and ICE gathers
127.0.0.1 only (the ``loopback_ice`` fixture, through ``peers``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from aiortc import RTCSessionDescription

from dhtsignal.aio import rtc
from dhtsignal.datadir import STATE_FILE
from dhtsignal.dialing import _one_line
from dhtsignal.errors import (
    ConfigError,
    ConnectFailed,
    DialFailed,
    PeerNotFound,
    SessionClosed,
    UsageError,
)
from dhtsignal.identity import Identity
from dhtsignal.peer import (
    ChannelOptions,
    IncomingFailed,
    Peer,
    PeerConfig,
    PeerEvent,
    Session,
    SignalReceived,
    SignalSent,
)
from dhtsignal.presence import resolve
from dhtsignal.signaling.envelope import MessageType
from dhtsignal.signaling.inbox import OfferReceived
from dhtsignal.signaling.session import SessionTimeouts

if TYPE_CHECKING:
    from conftest import StartDht, StartPeer

#: Generous bound for steps that take milliseconds on loopback.
STEP = 10.0


@pytest.fixture
async def boot(dht: StartDht) -> list[str]:
    """Bootstrap address of a fresh three-node DHT."""
    nodes = await dht(3)
    assert nodes[0].address is not None
    host, port = nodes[0].address
    return [f"{host}:{port}"]


async def accept(peer: Peer, timeout: float = STEP) -> Session:
    """The next session another peer opened to ``peer``."""
    return await asyncio.wait_for(anext(peer.incoming()), timeout)


async def dial(peer: Peer, node_id: str, timeout: float = STEP, **kwargs: Any) -> Session:
    return await asyncio.wait_for(peer.connect(node_id, **kwargs), timeout)


class NeverAnswers(rtc.PeerConnection):
    """A callee's connection whose answer is never made (until the handshake is cancelled)."""

    async def createAnswer(self) -> RTCSessionDescription:
        await asyncio.get_running_loop().create_future()
        raise AssertionError("unreachable")


class HeldOffer(rtc.PeerConnection):
    """A caller's connection whose offer, once gathered, waits for ``hold`` (slow gathering)."""

    hold: asyncio.Future[None] | None = None

    async def setLocalDescription(
        self, sessionDescription: RTCSessionDescription | None = None
    ) -> None:
        await super().setLocalDescription(sessionDescription)
        held = sessionDescription is not None and sessionDescription.type == "offer"
        if self.hold is not None and held:
            await self.hold


def connections(cls: type[rtc.PeerConnection]) -> Callable[[Any], rtc.PeerConnection]:
    """A ``connection_factory`` making ``cls`` connections, configured as the default one."""

    def make(ice_servers: Any) -> rtc.PeerConnection:
        rtc.limit_ice_retransmissions()
        return cls(rtc.rtc_configuration(ice_servers))

    return make


class ClosesAfterAnswering:
    """A callee's ``connection_factory`` and ``observer``: each connection is closed right
    after the answer made on it was sent, so the answer's candidates lead nowhere; and a
    future of the callee's first incoming handshake failure."""

    def __init__(self) -> None:
        self.made: list[rtc.PeerConnection] = []
        self.closing: list[asyncio.Future[None]] = []
        self.gave_up: asyncio.Future[IncomingFailed] = asyncio.get_running_loop().create_future()

    def connection_factory(self, ice_servers: Any) -> rtc.PeerConnection:
        pc: rtc.PeerConnection = connections(rtc.PeerConnection)(ice_servers)
        self.made.append(pc)
        return pc

    def observer(self, event: PeerEvent) -> None:
        if isinstance(event, SignalSent) and event.msg_type == MessageType.ANSWER:
            self.closing.append(asyncio.ensure_future(self.made[-1].close()))
        if isinstance(event, IncomingFailed) and not self.gave_up.done():
            self.gave_up.set_result(event)

    def options(self) -> dict[str, Any]:
        return {"connection_factory": self.connection_factory, "observer": self.observer}


@pytest.mark.timeout(20)
async def test_session_carries_bytes_and_text_both_ways(peers: StartPeer, boot: list[str]) -> None:
    """Messages of both types flow both ways; ping measures a round trip; flush returns only
    once the remote application has every message; phases and path are reported."""
    alice = await peers("alice", boot)
    bob = await peers("bob", boot)
    out = await dial(alice, "bob")
    inc = await accept(bob)

    assert inc.session_id == out.session_id
    assert (out.remote_id, out.remote_key) == ("bob", bob.public_key)
    assert (inc.remote_id, inc.remote_key) == ("alice", alice.public_key)
    assert out.is_open and inc.is_open

    await out.send(b"\x00bytes from alice\xff")
    await out.send("text from alice: \u00e9\u2603")
    assert await inc.recv(STEP) == b"\x00bytes from alice\xff"
    assert await inc.recv(STEP) == "text from alice: \u00e9\u2603"
    await inc.send("text from bob")
    await inc.send(b"bytes from bob")
    assert await out.recv(STEP) == "text from bob"
    assert await out.recv(STEP) == b"bytes from bob"

    assert await out.ping() > 0
    assert await inc.ping() > 0

    # flush(): resolved by the remote's "synced", which it sends only once its
    # application-facing side has taken every message. Watch arrivals on bob's side
    # directly: when flush() returns, the last one must already have arrived.
    burst = 40
    loop = asyncio.get_running_loop()
    all_arrived: asyncio.Future[None] = loop.create_future()
    arrived: list[bytes | str] = []

    def on_message(message: bytes | str) -> None:
        arrived.append(message)
        if len(arrived) == burst and not all_arrived.done():
            all_arrived.set_result(None)

    inc.data.on("message", on_message)
    for i in range(burst):
        await out.send(i.to_bytes(2, "big") * 500)
    await out.flush(STEP)
    assert all_arrived.done(), f"flush returned with {len(arrived)}/{burst} delivered"
    assert [await inc.recv(STEP) for _ in range(burst)] == [
        i.to_bytes(2, "big") * 500 for i in range(burst)
    ]
    await inc.flush(STEP)  # bob sent two messages; alice took both

    phases = out.phases
    assert phases is not None
    parts = (phases.resolve, phases.signaling, phases.ice, phases.dtls_sctp)
    assert all(p is not None and p > 0 for p in parts), phases
    assert phases.total is not None and phases.total >= sum(p for p in parts if p) - 1e-6
    assert out.path == ("host", "host")
    # The callee resolves nothing; it reports the other phases.
    assert inc.phases is not None and inc.phases.resolve is None
    callee_parts = (inc.phases.signaling, inc.phases.ice, inc.phases.dtls_sctp)
    assert all(p is not None and p > 0 for p in callee_parts), inc.phases
    assert inc.path == ("host", "host")

    await out.close()
    assert not out.is_open
    with pytest.raises(SessionClosed):
        await out.send(b"after close")


@pytest.mark.timeout(20)
async def test_unread_messages_are_bounded(peers: StartPeer, boot: list[str]) -> None:
    """A remote that sends faster than the application reads ends the session; it does
    not grow memory without bound, and nothing within the limit is lost unseen."""
    bob = await peers("bob", boot, config=PeerConfig(max_unread_bytes=100))
    alice = await peers("alice", boot)
    session = await dial(alice, "bob")
    incoming = await accept(bob)
    await session.send(b"x" * 60)
    await session.send(b"y" * 60)  # bob has read nothing: 120 unread bytes
    assert await incoming.recv(STEP) == b"x" * 60  # within the limit: kept
    with pytest.raises(SessionClosed):  # the second message passed it: closed
        await incoming.recv(STEP)
    assert bob.stats["closed:unread-limit"] == 1
    assert not incoming.is_open


def test_printed_messages_stay_on_one_line_and_cannot_drive_a_terminal() -> None:
    assert _one_line("a\\b\nc\rd\te\x1b[31mred\x7f é") == ("a\\\\b\\nc\\rd\\te\\x1b[31mred\\x7f é")


@pytest.mark.timeout(20)
async def test_bootstrap_by_host_name(peers: StartPeer, boot: list[str]) -> None:
    """A bootstrap address may name a host: it is resolved before the join (replies are
    matched by source IP, so sending to the name as such would never count an answer)."""
    port = boot[0].rsplit(":", 1)[1]
    alice = await peers("alice", [f"localhost:{port}"])
    assert len(alice.node.table) >= 1
    assert (await resolve(alice.node, "alice")).key == alice.public_key.hex()


@pytest.mark.timeout(20)
async def test_unknown_and_signed_off_peers_are_not_found_fast(
    peers: StartPeer, boot: list[str]
) -> None:
    loop = asyncio.get_running_loop()
    alice = await peers("alice", boot)
    for target in ("nobody-here", Identity.generate().self_id):
        t0 = loop.time()
        with pytest.raises(PeerNotFound, match="unknown"):
            await alice.connect(target)
        assert loop.time() - t0 < 3.0

    carol = await peers("carol", boot)
    assert (await resolve(alice.node, "carol")).public_key == carol.public_key
    await carol.close()  # publishes tombstones
    t0 = loop.time()
    with pytest.raises(PeerNotFound, match="signed off"):
        await alice.connect("carol")
    assert loop.time() - t0 < 1.0


@pytest.mark.timeout(20)
async def test_silent_callee_gives_answer_timeout(peers: StartPeer, boot: list[str]) -> None:
    """The offer reaches bob but he never answers: DialFailed(answer-timeout) when the
    session machine's answer deadline passes, with the machine's reason."""
    answer_deadline = 1.5
    alice = await peers("alice", boot, timeouts=SessionTimeouts(answer=answer_deadline))
    loop = asyncio.get_running_loop()
    offer_seen: asyncio.Future[bytes] = loop.create_future()

    def observe(event: PeerEvent) -> None:
        if (
            isinstance(event, SignalReceived)
            and isinstance(event.outcome, OfferReceived)
            and not offer_seen.done()
        ):
            offer_seen.set_result(event.outcome.sender)

    bob = await peers("bob", boot, observer=observe, connection_factory=connections(NeverAnswers))
    t0 = loop.time()
    with pytest.raises(DialFailed) as failed:
        await alice.connect("bob")
    elapsed = loop.time() - t0
    assert failed.value.reason == "answer-timeout"
    assert failed.value.node_id == "bob"
    assert f"no answer within {answer_deadline:.1f} s" in str(failed.value)
    assert "offer stored in the DHT" in str(failed.value)
    assert answer_deadline - 0.05 <= elapsed < answer_deadline + 1.0
    assert offer_seen.done() and offer_seen.result() == alice.public_key
    assert bob.stats["incoming-failed"] == 0  # bob's own answer deadline (6 s) is still ahead
    assert bob._pending_incoming == 1


@pytest.mark.timeout(20)
async def test_callee_answer_deadline_fails_the_handshake(
    peers: StartPeer, boot: list[str]
) -> None:
    """The callee's machine bounds its own answering: a callee that cannot make its answer
    within its answer deadline gives the handshake up (counted), and the caller hears
    nothing and fails at its own, later, answer deadline."""
    loop = asyncio.get_running_loop()
    gave_up: asyncio.Future[IncomingFailed] = loop.create_future()

    def observe(event: PeerEvent) -> None:
        if isinstance(event, IncomingFailed) and not gave_up.done():
            gave_up.set_result(event)

    bob = await peers(
        "bob",
        boot,
        timeouts=SessionTimeouts(answer=0.5),
        observer=observe,
        connection_factory=connections(NeverAnswers),
    )
    alice = await peers("alice", boot, timeouts=SessionTimeouts(answer=2.0))
    dialing = asyncio.ensure_future(alice.connect("bob"))
    t0 = loop.time()
    failure = await asyncio.wait_for(gave_up, STEP)
    assert 0.45 <= loop.time() - t0 < 1.5
    assert isinstance(failure.error, DialFailed)
    assert failure.error.reason == "answer-timeout"
    assert "could not answer within 0.5 s" in str(failure.error)
    assert failure.remote_key == alice.public_key
    assert bob.stats["incoming-failed"] == 1 and bob._pending_incoming == 0
    with pytest.raises(DialFailed) as failed:
        await asyncio.wait_for(dialing, STEP)
    assert failed.value.reason == "answer-timeout"


@pytest.mark.timeout(20)
async def test_ice_failure_is_connect_failed_with_candidate_types(
    peers: StartPeer, boot: list[str]
) -> None:
    """bob answers, then closes his connection: the answer's candidates lead nowhere."""
    connect_deadline = 3.0
    alice = await peers("alice", boot, timeouts=SessionTimeouts(connect=connect_deadline))
    loop = asyncio.get_running_loop()
    closer = ClosesAfterAnswering()
    bob = await peers("bob", boot, **closer.options())
    t0 = loop.time()
    with pytest.raises(ConnectFailed) as failed:
        await alice.connect("bob")
    elapsed = loop.time() - t0
    exc = failed.value
    assert exc.reason in ("timeout", "ice-failed"), exc
    assert elapsed < connect_deadline + 1.0
    # A DHT node (the bootstrap node) served as STUN server: a srflx candidate, which
    # on loopback is the host address, so the compact SDP leaves it out of the answer.
    assert exc.local_types == ("host", "srflx") and exc.remote_types == ("host",)
    assert "local candidates: host, srflx; remote candidates: host" in str(exc)
    assert "NAT here: open, at bob: open" in str(exc)
    assert isinstance((await asyncio.wait_for(closer.gave_up, STEP)).error, ConnectFailed)
    assert bob.stats["incoming-failed"] == 1
    assert bob._incoming.empty()


@pytest.mark.timeout(20)
async def test_connect_deadline_comes_from_the_session_machine(
    peers: StartPeer, boot: list[str]
) -> None:
    """ICE to a callee that closed after answering cannot report failure for 7.5 s; the
    machine's connect deadline (counted from the answer) ends the dial first, as a
    ConnectFailed(timeout) with the candidate types, and the phases before it are kept."""
    connect_deadline = 1.0
    alice = await peers("alice", boot, timeouts=SessionTimeouts(connect=connect_deadline))
    await peers("bob", boot, **ClosesAfterAnswering().options())
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    with pytest.raises(ConnectFailed) as failed:
        await asyncio.wait_for(alice.connect("bob"), STEP)
    elapsed = loop.time() - t0
    assert failed.value.reason == "timeout", failed.value
    assert connect_deadline - 0.05 <= failed.value.seconds < connect_deadline + 0.5
    assert connect_deadline <= elapsed < connect_deadline + 1.5
    assert failed.value.local_types == ("host", "srflx")
    assert not alice._dials and not alice._sessions


@pytest.mark.timeout(20)
async def test_glare_ends_with_one_session(peers: StartPeer, boot: list[str]) -> None:
    """Both dial each other at once: one session, the same on both sides."""
    alice = await peers("alice", boot)
    bob = await peers("bob", boot)
    a, b = await asyncio.wait_for(asyncio.gather(alice.connect("bob"), bob.connect("alice")), STEP)
    assert a.session_id == b.session_id
    assert a.is_open and b.is_open
    await a.send("from alice")
    assert await b.recv(STEP) == "from alice"
    await b.send(b"from bob")
    assert await a.recv(STEP) == b"from bob"

    yielded = [alice.stats["glare-yielded"], bob.stats["glare-yielded"]]
    assert sorted(yielded) == [0, 1], (alice.stats, bob.stats)
    loser, winner = (alice, bob) if yielded[0] else (bob, alice)
    assert loser.stats["glare-kept-own"] == 0
    assert winner.stats["glare-kept-own"] <= 1
    # The winner's key is the lower one (glare_winner), and nobody answers a second offer.
    assert winner.public_key < loser.public_key
    for p in (alice, bob):
        assert p._incoming.empty() and p._pending_incoming == 0, p.stats
        assert p.stats["refused:unexpected-answer"] == 0, p.stats


@pytest.mark.timeout(20)
async def test_five_concurrent_sessions(peers: StartPeer, boot: list[str]) -> None:
    alice = await peers("alice", boot)
    bob = await peers("bob", boot)
    outs = await asyncio.wait_for(asyncio.gather(*(alice.connect("bob") for _ in range(5))), STEP)
    incs = {s.session_id: s for s in [await accept(bob) for _ in range(5)]}
    assert sorted(incs) == sorted(s.session_id for s in outs)
    for i, out in enumerate(outs):
        await out.send(f"message {i}")
    for i, out in enumerate(outs):
        assert await incs[out.session_id].recv(STEP) == f"message {i}"
        await incs[out.session_id].send(i.to_bytes(1, "big"))
    for i, out in enumerate(outs):
        assert await out.recv(STEP) == i.to_bytes(1, "big")
    assert all(s.is_open for s in [*outs, *incs.values()])


async def test_a_sender_that_closes_at_once_still_delivers(
    peers: StartPeer, boot: list[str]
) -> None:
    """One-shot senders (``dhtsignal send``): each opens, sends, waits for the remote
    application's acknowledgement and closes at once. The callee may see the close before
    it finished opening its side; the session is still handed out with the message."""
    alice = await peers("alice", boot)
    senders = [await peers(None, boot) for _ in range(3)]

    async def send_once(peer: Peer, text: str) -> None:
        session = await dial(peer, "alice")
        await session.send(text)
        await session.flush(STEP)
        await session.close()

    texts = {f"one-shot {i}" for i in range(len(senders))}
    await asyncio.wait_for(
        asyncio.gather(*(send_once(p, t) for p, t in zip(senders, sorted(texts), strict=True))),
        STEP,
    )
    got = set()
    for _ in senders:
        inc = await accept(alice)
        got.add(await inc.recv(STEP))
    assert got == texts
    assert alice.stats["incoming-failed"] == 0


@pytest.mark.timeout(20)
async def test_unordered_partially_reliable_channel(peers: StartPeer, boot: list[str]) -> None:
    alice = await peers("alice", boot)
    bob = await peers("bob", boot)
    out = await dial(alice, "bob", ordered=False, max_retransmits=0)
    inc = await accept(bob)
    wanted = ChannelOptions(ordered=False, max_retransmits=0, max_packet_life_time=None)
    assert out.options == wanted and inc.options == wanted
    for s in (out, inc):
        assert s.data.ordered is False and s.data.maxRetransmits == 0
        assert s.ctl.ordered is True and s.ctl.maxRetransmits is None
    await out.send(b"best effort")
    assert await inc.recv(STEP) == b"best effort"


@pytest.mark.timeout(20)
async def test_accept_policy(peers: StartPeer, boot: list[str]) -> None:
    """bob accepts alice (by label) and an anonymous peer (by self-certifying ID) only."""
    loop = asyncio.get_running_loop()
    anon = await peers(None, boot)
    bob = await peers("bob", boot, accept=["alice", anon.self_id])
    alice = await peers("alice", boot)
    carol = await peers("carol", boot)

    await dial(alice, "bob")
    assert (await accept(bob)).remote_id == "alice"
    await dial(anon, "bob")
    assert (await accept(bob)).remote_id == anon.self_id

    t0 = loop.time()
    with pytest.raises(DialFailed) as refused:
        await carol.connect("bob")
    assert loop.time() - t0 < carol.timeouts.answer
    assert refused.value.reason == "rejected"
    assert refused.value.node_id == "bob"
    assert "not accepted" in str(refused.value)
    assert bob.stats["refused:policy"] == 1
    assert bob._incoming.empty()


@pytest.mark.timeout(20)
async def test_claimed_label_is_verified(peers: StartPeer, boot: list[str]) -> None:
    """An offer's node-ID label is the sender's claim: it must match the label's owner."""
    alice = await peers("alice", boot)
    bob = await peers("bob", boot)
    guarded = await peers("guarded", boot, accept=["alice"])
    mallory = await peers("mallory", boot)
    mallory.node_id = "alice"  # mallory's offers now claim the label "alice"

    await dial(mallory, "bob")
    inc = await accept(bob)
    assert inc.remote_key == mallory.public_key
    assert inc.remote_id == mallory.self_id  # not "alice"

    with pytest.raises(DialFailed) as refused:
        await mallory.connect("guarded")
    assert refused.value.reason == "rejected"
    assert guarded.stats["refused:policy"] == 1
    await dial(alice, "guarded")
    assert (await accept(guarded)).remote_id == "alice"


@pytest.mark.timeout(30)
async def test_restarted_peer_can_be_dialed_again(
    peers: StartPeer, boot: list[str], tmp_path: Path
) -> None:
    alice = await peers("alice", boot)
    bob = await peers("bob", boot, data_dir=tmp_path / "bob")
    first = await dial(alice, "bob")
    await first.send(b"before restart")
    assert await (await accept(bob)).recv(STEP) == b"before restart"
    key = bob.public_key
    await bob.close()

    bob2 = await peers("bob", boot, data_dir=tmp_path / "bob")
    assert bob2.public_key == key
    second = await dial(alice, "bob")
    assert second.session_id != first.session_id
    inc = await accept(bob2)
    assert inc.session_id == second.session_id
    await second.send(b"after restart")
    assert await inc.recv(STEP) == b"after restart"
    await inc.send(b"bob is back")
    assert await second.recv(STEP) == b"bob is back"


@pytest.mark.timeout(20)
async def test_close_ends_both_sides_and_fails_fast(peers: StartPeer, boot: list[str]) -> None:
    """Closing one end ends the other's iteration; flush, ping and send on a closed session
    raise SessionClosed at once; concurrent flushes of the same messages both return."""
    alice = await peers("alice", boot)
    bob = await peers("bob", boot)
    out = await dial(alice, "bob")
    inc = await accept(bob)
    await out.send(b"last words")
    await asyncio.wait_for(asyncio.gather(out.flush(STEP), out.flush(STEP)), STEP)
    await out.close()

    async def rest() -> list[bytes | str]:
        return [m async for m in inc]

    assert await asyncio.wait_for(rest(), STEP) == [b"last words"]
    assert not inc.is_open
    loop = asyncio.get_running_loop()
    for s in (out, inc):
        with pytest.raises(SessionClosed):
            await s.recv(STEP)
        t0 = loop.time()
        with pytest.raises(SessionClosed):
            await s.flush(STEP)
        with pytest.raises(SessionClosed):
            await s.ping(STEP)
        with pytest.raises(SessionClosed):
            await s.send(b"too late")
        assert loop.time() - t0 < 0.5


@pytest.mark.timeout(20)
async def test_restarted_peer_ignores_offers_to_its_previous_run(
    peers: StartPeer, boot: list[str], tmp_path: Path
) -> None:
    alice = await peers("alice", boot)
    bob = await peers("bob", boot, data_dir=tmp_path)
    await dial(alice, "bob")
    await accept(bob)
    await bob.close()
    bob2 = await peers("bob", boot, data_dir=tmp_path)
    await dial(alice, "bob")
    await accept(bob2)
    # bob2 handled its stored inbox (the old offer) before the new offer that opened this
    # session: it must not be answering the old one.
    assert bob2._pending_incoming == 0, bob2.stats


@pytest.mark.timeout(20)
async def test_glare_loser_sends_no_offer_after_yielding(peers: StartPeer, boot: list[str]) -> None:
    """The glare loser's own offer is gathered only after the winner's session opened (slow
    gathering): it must not send it then, or the winner would answer a second session."""
    holds: dict[str, asyncio.Future[None]] = {}
    sent: dict[str, list[bytes]] = {"alice": [], "bob": []}

    def make(name: str) -> dict[str, Any]:
        def factory(ice_servers: Any) -> rtc.PeerConnection:
            pc = connections(HeldOffer)(ice_servers)
            assert isinstance(pc, HeldOffer)
            pc.hold = holds.get(name)
            return pc

        def observe(event: PeerEvent) -> None:
            if isinstance(event, SignalSent) and event.msg_type == MessageType.OFFER:
                sent[name].append(event.session_id)

        return {"connection_factory": factory, "observer": observe}

    alice = await peers("alice", boot, **make("alice"))
    bob = await peers("bob", boot, **make("bob"))
    winner, loser = sorted((alice, bob), key=lambda p: p.public_key)
    assert winner.node_id is not None and loser.node_id is not None
    loop = asyncio.get_running_loop()
    winner_done: asyncio.Future[None] = loop.create_future()
    holds[loser.node_id] = winner_done  # the loser's offers wait for the winner's session
    tasks: dict[str, asyncio.Future[Session]] = {}
    tasks["winner"] = asyncio.ensure_future(winner.connect(loser.node_id))
    tasks["loser"] = asyncio.ensure_future(loser.connect(winner.node_id))
    tasks["winner"].add_done_callback(lambda _: winner_done.set_result(None))
    w, lo = await asyncio.wait_for(asyncio.gather(tasks["winner"], tasks["loser"]), STEP)
    assert w.session_id == lo.session_id
    assert (loser.stats["glare-yielded"], winner.stats["glare-yielded"]) == (1, 0)
    assert sent[loser.node_id] == []
    assert sent[winner.node_id] == [w.session_id]
    await lo.send(b"one session")
    assert await w.recv(STEP) == b"one session"


@pytest.mark.timeout(20)
async def test_kept_state_is_loaded_at_start_and_saved_at_close(
    peers: StartPeer, boot: list[str], tmp_path: Path
) -> None:
    """The peer daemon's start path: with keep_state the DHT state is saved at close and
    restored at the next start; a corrupt state file is a ConfigError naming the data
    directory, and is kept (never saved over) for the operator to look at."""
    keep = PeerConfig(keep_state=True)
    bob = await peers("bob", boot, data_dir=tmp_path, config=keep)
    await bob.close()
    state = tmp_path / STATE_FILE
    assert state.exists() and state.stat().st_size > 0
    bob2 = await peers("bob", [], data_dir=tmp_path, config=keep)
    assert len(bob2.node.table) >= 1  # contacts restored, with no bootstrap address given
    await bob2.close()

    state.write_bytes(b"\xc1 not msgpack")
    with pytest.raises(ConfigError, match="data_dir"):
        await peers("bob", boot, data_dir=tmp_path, config=keep)
    assert state.read_bytes() == b"\xc1 not msgpack"
    with pytest.raises(UsageError, match="data_dir"):
        Peer(None, boot, config=keep)  # anonymous: no data directory (a label has a default)
