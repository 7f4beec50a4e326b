"""The signaling session state machine, one per connection attempt, with no I/O.

Theory of operation
-------------------

A session is one attempt to open a data channel with one peer. The caller's side::

    RESOLVING --resolved--> OFFERED --offer_sent--> OFFERED --answer_received--> ANSWERED
    ANSWERED --ice_connected--> CONNECTING --channel_open--> OPEN --closed--> CLOSED

and the callee's side, which starts when an offer has arrived::

    OFFERED --answer_sent--> ANSWERED --ice_connected--> CONNECTING --channel_open--> OPEN

From every state before CLOSED and FAILED, ``failed(reason)`` leads to FAILED and
``closed`` to CLOSED. Every input happens at most once per session. Anything else is a
local bug and raises :class:`~dhtsignal.errors.UsageError`. The machine enforces nothing
by itself: the caller feeds it inputs with the time ``now`` and arms one timer for
:attr:`SessionMachine.deadline`; :meth:`SessionMachine.timer` turns a missed deadline
into failure. Each input returns a past-tense event: :class:`SessionAdvanced`,
:class:`SessionOpened` (with the :class:`Phases` split), :class:`SessionEnded` or
:class:`SessionFailed`.

Deadlines (:class:`SessionTimeouts`) run per stage, not per input: resolving has its own,
the whole exchange of descriptions another, and ICE plus DTLS plus SCTP a third.

Glare: when two peers dial each other at once, each holds the other's offer while its
own is pending. :func:`glare_winner` decides deterministically and symmetrically which
offer survives: the side whose (key, session id) is lower keeps its offer; the other
drops its own session and answers.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass

from dhtsignal.errors import ConfigError, UsageError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SessionTimeouts:
    """Deadlines of the stages of a session, in seconds."""

    resolve: float = 3.0
    """From the start until the callee's presence record is found (caller only)."""
    answer: float = 6.0
    """From entering OFFERED until the answer is received (caller) or sent (callee):
    candidate gathering on both sides, sealing, the DHT puts and the notifications."""
    connect: float = 10.0
    """From entering ANSWERED until the data channel is open and the channel binding
    checked: ICE, DTLS, SCTP and one control-channel message each way.
    aioice is tuned to report ICE failure within it (see :mod:`dhtsignal.aio.rtc`)."""

    def __post_init__(self) -> None:
        for name in ("resolve", "answer", "connect"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"timeouts.{name}", "must be a positive number of seconds")


@dataclass(frozen=True)
class Phases:
    """Where a session's time went, in seconds; None for a stage not (yet) passed."""

    resolve: float | None
    """Finding the callee's presence record (None on the callee's side)."""
    signaling: float | None
    """From entering OFFERED to entering ANSWERED: gathering, sealing, DHT round trip."""
    ice: float | None
    """ICE connectivity checks, until a pair is nominated."""
    dtls_sctp: float | None
    """DTLS handshake, SCTP association and the channel-binding check, until the
    session is handed out."""
    total: float | None
    """From the start until the channel opened."""


@dataclass(frozen=True)
class SessionAdvanced:
    """An input moved the session on; ``step`` names the input."""

    step: str
    state: SessionMachine.State
    elapsed: float


@dataclass(frozen=True)
class SessionOpened:
    """The data channel is open."""

    phases: Phases


@dataclass(frozen=True)
class SessionEnded:
    """The session was closed while in ``state``."""

    state: SessionMachine.State
    elapsed: float


@dataclass(frozen=True)
class SessionFailed:
    """The session failed while in ``state``; ``reason`` is a short tag such as
    ``resolve-timeout``, ``answer-timeout``, ``connect-timeout`` or the caller's own."""

    reason: str
    state: SessionMachine.State
    elapsed: float


SessionEvent = SessionAdvanced | SessionOpened | SessionEnded | SessionFailed


class SessionMachine:
    """One session's state, deadlines and phase timestamps.

    :param now: the start time.
    :param caller: True on the dialing side (starts in RESOLVING), False on the answering
        side (starts in OFFERED, an offer in hand).
    :param timeouts: the stage deadlines.
    """

    class State(enum.Enum):
        """Where a session stands (see the module docstring for the transitions)."""

        RESOLVING = "resolving"
        OFFERED = "offered"
        ANSWERED = "answered"
        CONNECTING = "connecting"
        OPEN = "open"
        CLOSED = "closed"
        FAILED = "failed"

    def __init__(
        self, now: float, *, caller: bool, timeouts: SessionTimeouts = SessionTimeouts()
    ) -> None:
        self.caller = caller
        self.timeouts = timeouts
        self.state = self.State.RESOLVING if caller else self.State.OFFERED
        self.started = now
        self.times: dict[str, float] = {}
        """When each input happened, by input name."""
        self._entered = {self.state: now}
        self._table = CALLER_TRANSITIONS if caller else CALLEE_TRANSITIONS

    @property
    def deadline(self) -> float | None:
        """When :meth:`timer` must next be called; None once the session has ended."""
        stage = STAGE_DEADLINES.get(self.state)
        if stage is None:
            return None
        entered, name = stage
        limit: float = getattr(self.timeouts, name)
        return self._entered[entered] + limit

    @property
    def phases(self) -> Phases:
        """The time split so far (complete once the session is OPEN)."""
        t = self._entered.get

        def span(start: float | None, end: float | None) -> float | None:
            return None if start is None or end is None else end - start

        return Phases(
            resolve=span(t(_S.RESOLVING), t(_S.OFFERED)),
            signaling=span(t(_S.OFFERED), t(_S.ANSWERED)),
            ice=span(t(_S.ANSWERED), t(_S.CONNECTING)),
            dtls_sctp=span(t(_S.CONNECTING), t(_S.OPEN)),
            total=span(self.started, t(_S.OPEN)),
        )

    def resolved(self, now: float) -> SessionEvent:
        """The callee's presence record was found.

        :param now: the current time.
        """
        return self._input("resolved", now)

    def offer_sent(self, now: float) -> SessionEvent:
        """The sealed offer was stored in the callee's inbox.

        :param now: the current time.
        """
        return self._input("offer_sent", now)

    def answer_received(self, now: float) -> SessionEvent:
        """The callee's answer arrived and was applied.

        :param now: the current time.
        """
        return self._input("answer_received", now)

    def answer_sent(self, now: float) -> SessionEvent:
        """The sealed answer was stored in the caller's inbox (callee only).

        :param now: the current time.
        """
        return self._input("answer_sent", now)

    def ice_connected(self, now: float) -> SessionEvent:
        """ICE nominated a candidate pair.

        :param now: the current time.
        """
        return self._input("ice_connected", now)

    def channel_open(self, now: float) -> SessionEvent:
        """The data channel opened.

        :param now: the current time.
        """
        return self._input("channel_open", now)

    def closed(self, now: float) -> SessionEvent:
        """The session was closed, by either side, before or after it opened.

        :param now: the current time.
        """
        return self._input("closed", now)

    def failed(self, now: float, reason: str) -> SessionEvent:
        """The session failed for ``reason`` (for example ``ice-failed``).

        :param now: the current time.
        :param reason: a short tag for the failure.
        """
        return self._input("failed", now, reason)

    def timer(self, now: float) -> SessionEvent | None:
        """Fail the session if its current stage's deadline has passed.

        :param now: the current time.
        :returns: :class:`SessionFailed` on a missed deadline, else None.
        """
        deadline = self.deadline
        if deadline is None or now < deadline:
            return None
        return self._input("failed", now, f"{STAGE_DEADLINES[self.state][1]}-timeout")

    def _input(self, name: str, now: float, reason: str = "") -> SessionEvent:
        target = self._table.get((self.state, name))
        missing = PREREQUISITES.get(name, frozenset()) - self.times.keys()
        if target is None or name in self.times or missing:
            raise UsageError(f"session input {name!r} is invalid in state {self.state.name}")
        previous, self.state = self.state, target
        self.times[name] = now
        self._entered.setdefault(target, now)
        logger.debug("session %s -> %s on %s %s", previous.name, target.name, name, reason)
        elapsed = now - self.started
        if target is _S.OPEN:
            return SessionOpened(self.phases)
        if target is _S.CLOSED:
            return SessionEnded(previous, elapsed)
        if target is _S.FAILED:
            return SessionFailed(reason, previous, elapsed)
        return SessionAdvanced(name, target, elapsed)


def glare_winner(
    local_key: bytes, remote_key: bytes, local_session: bytes, remote_session: bytes
) -> bool:
    """Whether the local side keeps its outgoing offer when offers cross.

    The side whose (Ed25519 key, session id) is lower wins; the loser drops its own
    session and answers the winner's offer. Both sides compute the same outcome.

    :param local_key: the local Ed25519 public key.
    :param remote_key: the remote Ed25519 public key.
    :param local_session: the local outgoing session id.
    :param remote_session: the remote outgoing session id.
    :raises UsageError: if both sides are the same session.
    """
    local, remote = (local_key, local_session), (remote_key, remote_session)
    if local == remote:
        raise UsageError("glare needs two different sessions")
    return local < remote


_S = SessionMachine.State
_LIVE = (_S.RESOLVING, _S.OFFERED, _S.ANSWERED, _S.CONNECTING, _S.OPEN)
_COMMON = {
    (_S.ANSWERED, "ice_connected"): _S.CONNECTING,
    (_S.CONNECTING, "channel_open"): _S.OPEN,
    **{(state, "closed"): _S.CLOSED for state in _LIVE},
    **{(state, "failed"): _S.FAILED for state in _LIVE},
}
CALLER_TRANSITIONS: dict[tuple[SessionMachine.State, str], SessionMachine.State] = {
    (_S.RESOLVING, "resolved"): _S.OFFERED,
    (_S.OFFERED, "offer_sent"): _S.OFFERED,
    (_S.OFFERED, "answer_received"): _S.ANSWERED,
    **_COMMON,
}
CALLEE_TRANSITIONS: dict[tuple[SessionMachine.State, str], SessionMachine.State] = {
    (_S.OFFERED, "answer_sent"): _S.ANSWERED,
    **_COMMON,
}
PREREQUISITES = {"answer_received": frozenset({"offer_sent"})}
"""Inputs that need another input first, beyond what the states express."""
STAGE_DEADLINES: dict[SessionMachine.State, tuple[SessionMachine.State, str]] = {
    _S.RESOLVING: (_S.RESOLVING, "resolve"),
    _S.OFFERED: (_S.OFFERED, "answer"),
    _S.ANSWERED: (_S.ANSWERED, "connect"),
    _S.CONNECTING: (_S.ANSWERED, "connect"),
}
"""Per live state before OPEN: the state whose entry starts the clock, and the
:class:`SessionTimeouts` field that bounds it."""
