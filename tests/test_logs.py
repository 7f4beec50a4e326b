"""Logs without secrets, JSON log lines, and the daemons' signals (separate OS processes).

Processes are started and killed by PID through :class:`test_cli.Launcher`.
"""

from __future__ import annotations

import io
import json
import logging
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_cli import LOOPBACK_RTC, Launcher

from dhtsignal import logs

SDP = (
    "v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\na=ice-ufrag:abcd\r\n"
    "a=ice-pwd:SuperSecretPassword1234\r\na=fingerprint:sha-256 AA:BB\r\n"
)


def test_sdps_ice_passwords_and_credentials_are_redacted() -> None:
    out = logs.redact(f"setLocalDescription(offer)\n{SDP}")
    assert "SuperSecret" not in out and "fingerprint" not in out
    assert out.startswith("setLocalDescription(offer)\n<SDP of ")
    assert logs.redact("a=ice-pwd:xyz") == "a=ice-pwd:<redacted>"
    cred = logs.redact("servers [{'urls': 'turn:h', 'credential': 'hunter2', 'username': 'u'}]")
    assert "hunter2" not in cred and "'username': 'u'" in cred
    assert logs.redact("password=abc seed: 00ff") == "password=<redacted> seed: <redacted>"
    assert logs.redact("nothing secret here") == "nothing secret here"


def _capture(fmt: str) -> tuple[logging.Logger, io.StringIO, logging.Handler]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(logs.RedactSecrets())
    handler.setFormatter(logs.JsonFormatter() if fmt == "json" else logging.Formatter())
    logger = logging.getLogger(f"test_logs.{fmt}")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    return logger, stream, handler


def test_json_lines_parse_and_carry_redacted_messages() -> None:
    logger, stream, handler = _capture("json")
    try:
        logger.debug("remote description %s", SDP)
        logger.warning("two\nlines")
        try:
            raise ValueError("password=oops")
        except ValueError:
            logger.exception("failed")
    finally:
        logger.removeHandler(handler)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 3  # a message with newlines is still one line
    parsed = [json.loads(line) for line in lines]
    assert [p["level"] for p in parsed] == ["debug", "warning", "error"]
    assert parsed[0]["logger"] == "test_logs.json" and "SuperSecret" not in lines[0]
    assert parsed[1]["message"] == "two\nlines"
    assert "oops" not in parsed[2]["exc"] and "ValueError" in parsed[2]["exc"]
    assert {"time", "level", "logger", "message"} <= set(parsed[0])


def test_the_webrtc_stack_stays_quiet_below_debug() -> None:
    root = logging.getLogger()
    saved = root.level, [logging.getLogger(n).level for n in logs.CHATTY]
    try:
        logs.set_level("info")
        assert all(logging.getLogger(n).level == logging.WARNING for n in logs.CHATTY)
        logs.set_level("debug")
        assert all(logging.getLogger(n).level == logging.DEBUG for n in logs.CHATTY)
    finally:
        root.setLevel(saved[0])
        for n, level in zip(logs.CHATTY, saved[1], strict=True):
            logging.getLogger(n).setLevel(level)


# -- processes ------------------------------------------------------------------------------


@pytest.fixture()
def lau(tmp_path: Path) -> Iterator[Launcher]:
    launcher = Launcher(tmp_path)
    try:
        yield launcher
    finally:
        launcher.close()


def _bootstrap(lau: Launcher, name: str, *extra: str) -> str:
    proc = lau.start(
        name, "bootstrap", "--listen", "127.0.0.1:0", "--data-dir", str(lau.workdir / name), *extra
    )
    return proc.ready()["addr"]


_PWD = re.compile(r"ice-pwd:(?!<redacted>)")


def test_a_debug_log_of_a_whole_session_holds_no_ice_password(lau: Launcher) -> None:
    entry = _bootstrap(lau, "b0")
    bob = lau.start(
        "bob",
        *("peer", "--node-id", "bob", "--bootstrap", entry, "--listen", "127.0.0.1:0"),
        *("--data-dir", str(lau.workdir / "bob"), "--ice-host", "127.0.0.1"),
        *("--log-level", "debug", "--log-format", "json"),
    )
    bob.ready()
    ping = lau.run(
        "ping", "bob", "--bootstrap", entry, *LOOPBACK_RTC, "--log-level", "debug",
        "--log-format", "json",
    )  # fmt: skip
    assert ping.returncode == 0, ping.stderr
    rc, _ = bob.signal_and_wait(signal.SIGTERM)
    assert rc == 0
    for text in (ping.stderr, bob.stderr()):
        records = [json.loads(line) for line in text.splitlines()]  # every line is JSON
        assert any(r["logger"].startswith("aiortc") for r in records)  # debug is on
        assert not _PWD.search(text) and "a=fingerprint" not in text
        assert any("SDP of" in r["message"] for r in records)


def _status(lau: Launcher, data_dir: Path) -> dict[str, Any]:
    res = lau.run("status", "--daemon", str(data_dir), "--json")
    assert res.returncode == 0, res.stderr
    st: dict[str, Any] = json.loads(res.stdout)
    return st


def test_sighup_reloads_log_level_and_accept_list_and_keeps_state(lau: Launcher) -> None:
    entry = _bootstrap(lau, "b0")
    conf = lau.workdir / "carol.toml"
    conf.write_text('log_level = "warning"\n')
    data = lau.workdir / "carol"
    carol = lau.start(
        "carol",
        *("peer", "--node-id", "carol", "--bootstrap", entry, "--listen", "127.0.0.1:0"),
        *("--data-dir", str(data), "--ice-host", "127.0.0.1", "--config", str(conf)),
    )
    carol.ready()
    before = _status(lau, data)
    assert before["records"] > 0  # carol's own claim and presence, at least
    assert "SIGHUP" not in carol.stderr()

    conf.write_text('log_level = "info"\naccept = ["alice"]\n')
    carol.popen.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10.0
    while "SIGHUP: reloaded settings: log_level info, accept alice" not in carol.stderr():
        assert time.monotonic() < deadline, carol.stderr()
        assert carol.popen.poll() is None, carol.stderr()
        _status(lau, data)  # a round trip through the daemon, then look again
    assert (data / "state.msgpack").exists()  # saved on SIGHUP
    after = _status(lau, data)
    assert after["records"] >= before["records"] and after["routing_id"] == before["routing_id"]

    # The reloaded accept list refuses a stranger, with one info line saying why.
    ping = lau.run("ping", "carol", "--bootstrap", entry, *LOOPBACK_RTC)
    assert ping.returncode == 1 and "not accepted" in ping.stderr
    refused = [ln for ln in carol.stderr().splitlines() if "refused" in ln]
    assert len(refused) == 1 and "not in the accept list" in refused[0]


@pytest.mark.parametrize("sig", [signal.SIGQUIT, signal.SIGHUP])
def test_signals_save_the_state(lau: Launcher, sig: int) -> None:
    entry = _bootstrap(lau, "b0")
    data = lau.workdir / "b1"
    b1 = lau.start(
        "b1", "bootstrap", "--listen", "127.0.0.1:0", "--data-dir", str(data),
        "--join", entry, "--save-interval", "3600",
    )  # fmt: skip
    b1.ready()
    peer = lau.start(
        "dan",
        *("peer", "--node-id", "dan", "--bootstrap", entry, "--listen", "127.0.0.1:0"),
        *("--data-dir", str(lau.workdir / "dan")),
    )
    peer.ready()
    held = _status(lau, data)["records"]
    assert held > 0 and not (data / "state.msgpack").exists()
    b1.popen.send_signal(sig)
    if sig == signal.SIGHUP:  # saves and keeps serving
        deadline = time.monotonic() + 10.0
        while not (data / "state.msgpack").exists():
            assert time.monotonic() < deadline and b1.popen.poll() is None
            _status(lau, data)
        assert _status(lau, data)["records"] == held
        rc, _ = b1.signal_and_wait(signal.SIGTERM)
    else:
        rc = b1.popen.wait(10)
    assert rc == 0, b1.stderr()
    assert "Traceback" not in b1.stderr()
    again = lau.start("b1-again", "bootstrap", "--listen", "127.0.0.1:0", "--data-dir", str(data))
    again.ready()
    assert _status(lau, data)["records"] == held
