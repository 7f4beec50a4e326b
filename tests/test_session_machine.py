"""The session state machine on a manual clock: every transition, every deadline, glare."""

from __future__ import annotations

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from dhtsignal.errors import ConfigError, UsageError
from dhtsignal.signaling.session import (
    Phases,
    SessionAdvanced,
    SessionEnded,
    SessionFailed,
    SessionMachine,
    SessionOpened,
    SessionTimeouts,
    glare_winner,
)

S = SessionMachine.State
INPUTS = (
    "resolved",
    "offer_sent",
    "answer_received",
    "answer_sent",
    "ice_connected",
    "channel_open",
    "closed",
    "failed",
)
T0 = 100.0

# The specification, written out independently of the module's tables: for each path of
# inputs, the state it reaches and the inputs then allowed (besides closed and failed,
# which every live state allows) with the state each leads to.
CALLER_SPEC = [
    ((), S.RESOLVING, {"resolved": S.OFFERED}),
    (("resolved",), S.OFFERED, {"offer_sent": S.OFFERED}),
    (("resolved", "offer_sent"), S.OFFERED, {"answer_received": S.ANSWERED}),
    (("resolved", "offer_sent", "answer_received"), S.ANSWERED, {"ice_connected": S.CONNECTING}),
    (
        ("resolved", "offer_sent", "answer_received", "ice_connected"),
        S.CONNECTING,
        {"channel_open": S.OPEN},
    ),
    (("resolved", "offer_sent", "answer_received", "ice_connected", "channel_open"), S.OPEN, {}),
]
CALLEE_SPEC = [
    ((), S.OFFERED, {"answer_sent": S.ANSWERED}),
    (("answer_sent",), S.ANSWERED, {"ice_connected": S.CONNECTING}),
    (("answer_sent", "ice_connected"), S.CONNECTING, {"channel_open": S.OPEN}),
    (("answer_sent", "ice_connected", "channel_open"), S.OPEN, {}),
]


def _feed(machine: SessionMachine, name: str, now: float) -> object:
    if name == "failed":
        return machine.failed(now, "ice-failed")
    return getattr(machine, name)(now)


def _drive(caller: bool, path: tuple[str, ...]) -> SessionMachine:
    machine = SessionMachine(T0, caller=caller)
    for step, name in enumerate(path, 1):
        _feed(machine, name, T0 + step)
    return machine


Case = tuple[bool, tuple[str, ...], SessionMachine.State, str, SessionMachine.State | None]


def _cases() -> list[Case]:
    cases: list[Case] = []
    for caller, spec in ((True, CALLER_SPEC), (False, CALLEE_SPEC)):
        for path, state, allowed in spec:
            allowed = {**allowed, "closed": S.CLOSED, "failed": S.FAILED}
            for name in INPUTS:
                cases.append((caller, path, state, name, allowed.get(name)))
            for end in ("closed", "failed"):  # nothing is allowed after the end
                cases += [(caller, (*path, end), S(end), name, None) for name in INPUTS]
    return cases


@pytest.mark.parametrize(("caller", "path", "state", "name", "target"), _cases())
def test_every_input_in_every_state(
    caller: bool,
    path: tuple[str, ...],
    state: SessionMachine.State,
    name: str,
    target: SessionMachine.State | None,
) -> None:
    machine = _drive(caller, path)
    assert machine.state is state
    if target is None:
        with pytest.raises(UsageError, match=name):
            _feed(machine, name, T0 + 50)
        assert machine.state is state
    else:
        _feed(machine, name, T0 + 50)
        assert machine.state is target


def test_caller_happy_path_events_and_phases() -> None:
    machine = SessionMachine(T0, caller=True)
    assert machine.resolved(T0 + 0.5) == SessionAdvanced("resolved", S.OFFERED, 0.5)
    assert machine.offer_sent(T0 + 1.0) == SessionAdvanced("offer_sent", S.OFFERED, 1.0)
    assert machine.answer_received(T0 + 2.0) == SessionAdvanced("answer_received", S.ANSWERED, 2.0)
    assert machine.ice_connected(T0 + 2.25) == SessionAdvanced("ice_connected", S.CONNECTING, 2.25)
    opened = machine.channel_open(T0 + 3.0)
    assert opened == SessionOpened(
        Phases(resolve=0.5, signaling=1.5, ice=0.25, dtls_sctp=0.75, total=3.0)
    )
    assert machine.deadline is None
    assert machine.times == {
        "resolved": T0 + 0.5,
        "offer_sent": T0 + 1.0,
        "answer_received": T0 + 2.0,
        "ice_connected": T0 + 2.25,
        "channel_open": T0 + 3.0,
    }
    assert machine.closed(T0 + 9) == SessionEnded(S.OPEN, 9.0)


def test_callee_phases_have_no_resolve() -> None:
    machine = SessionMachine(T0, caller=False)
    machine.answer_sent(T0 + 1)
    machine.ice_connected(T0 + 2)
    assert machine.phases == Phases(None, 1.0, 1.0, None, None)
    assert machine.channel_open(T0 + 4) == SessionOpened(Phases(None, 1.0, 1.0, 2.0, 4.0))


def test_failure_reports_reason_state_and_elapsed() -> None:
    machine = _drive(True, ("resolved", "offer_sent", "answer_received"))
    assert machine.failed(T0 + 7.5, "ice-failed") == SessionFailed("ice-failed", S.ANSWERED, 7.5)
    assert machine.deadline is None
    assert machine.timer(T0 + 1000) is None


# (caller, path fed at T0 + 1, T0 + 2, ..., deadline, reason)
DEADLINES = [
    (True, (), T0 + 3.0, "resolve-timeout"),
    (True, ("resolved",), T0 + 1 + 6.0, "answer-timeout"),
    (True, ("resolved", "offer_sent"), T0 + 1 + 6.0, "answer-timeout"),
    (True, ("resolved", "offer_sent", "answer_received"), T0 + 3 + 10.0, "connect-timeout"),
    (
        True,
        ("resolved", "offer_sent", "answer_received", "ice_connected"),
        T0 + 3 + 10.0,
        "connect-timeout",
    ),
    (False, (), T0 + 6.0, "answer-timeout"),
    (False, ("answer_sent",), T0 + 1 + 10.0, "connect-timeout"),
    (False, ("answer_sent", "ice_connected"), T0 + 1 + 10.0, "connect-timeout"),
]


@pytest.mark.parametrize(("caller", "path", "deadline", "reason"), DEADLINES)
def test_every_deadline(caller: bool, path: tuple[str, ...], deadline: float, reason: str) -> None:
    machine = _drive(caller, path)
    state = machine.state
    assert machine.deadline == pytest.approx(deadline)
    assert machine.timer(deadline - 0.001) is None
    assert machine.state is state
    event = machine.timer(deadline)
    assert isinstance(event, SessionFailed)
    assert (event.reason, event.state, event.elapsed) == (reason, state, deadline - T0)
    assert machine.state is S.FAILED


def test_custom_timeouts_are_used() -> None:
    machine = SessionMachine(T0, caller=True, timeouts=SessionTimeouts(resolve=0.25))
    assert machine.deadline == T0 + 0.25


@pytest.mark.parametrize("name", ["resolve", "answer", "connect"])
@pytest.mark.parametrize("value", [0.0, -1.0, float("nan")])
def test_timeouts_must_be_positive(name: str, value: float) -> None:
    with pytest.raises(ConfigError, match=name):
        SessionTimeouts(**{name: value})


def test_answer_needs_the_offer_sent_first() -> None:
    machine = _drive(True, ("resolved",))
    with pytest.raises(UsageError, match="answer_received"):
        machine.answer_received(T0 + 5)


keys = st.binary(min_size=32, max_size=32)
sessions = st.binary(min_size=8, max_size=8)


@given(keys, keys, sessions, sessions)
def test_glare_has_exactly_one_winner(a: bytes, b: bytes, sa: bytes, sb: bytes) -> None:
    assume((a, sa) != (b, sb))
    assert glare_winner(a, b, sa, sb) != glare_winner(b, a, sb, sa)
    assert glare_winner(a, b, sa, sb) == glare_winner(a, b, sa, sb)


@given(keys, keys, sessions, sessions)
def test_glare_lower_key_wins_whatever_the_sessions(
    a: bytes, b: bytes, sa: bytes, sb: bytes
) -> None:
    assume(a != b)
    assert glare_winner(a, b, sa, sb) is (a < b)


def test_glare_same_key_falls_back_to_sessions() -> None:
    key = b"\x07" * 32
    assert glare_winner(key, key, b"\x00" * 8, b"\x01" * 8)
    assert not glare_winner(key, key, b"\x01" * 8, b"\x00" * 8)
    with pytest.raises(UsageError):
        glare_winner(key, key, b"\x01" * 8, b"\x01" * 8)
