"""Log output of the commands: text or JSON lines on stderr, secrets redacted at every level.

Theory of operation
-------------------
:func:`setup` installs one stderr handler on the root logger with two parts:

- :class:`RedactSecrets`, a filter every record passes (ours and aiortc's/aioice's):
  a whole SDP is replaced by a one-line summary, ``a=ice-pwd:`` values and anything
  written as ``password``/``credential``/``secret``/``seed``/``private_key`` = value are
  replaced by ``<redacted>``. The record's message is rewritten once, so every
  formatter sees the redacted text.
- the formatter: ``text`` (``TIME LEVEL LOGGER: MESSAGE``) or ``json`` (one object per
  line: ``time``, ``level``, ``logger``, ``message`` and ``exc`` for a traceback).

The WebRTC libraries log every ICE check at info; below ``debug`` their loggers are held
at warning, so an info log has our one line per session, not theirs.
:func:`set_level` changes the level of a running process (a daemon's SIGHUP).
"""

from __future__ import annotations

import datetime
import json
import logging
import re
import sys
from typing import TextIO

#: Loggers of the WebRTC stack, held at warning unless the level is debug.
CHATTY = ("aioice", "aiortc")
REDACTED = "<redacted>"

_SDP = re.compile(r"(?ms)^v=0\r?$.*")
_ICE_PWD = re.compile(r"(a=ice-pwd:)\S+")
_SECRET = re.compile(
    r"""(?i)\b(password|passwd|credential|secret|seed|private_key|ice_pwd|pwd)(['"]?\s*[:=]\s*)"""
    r"""(['"]?)[^\s'",;}]+"""
)


def redact(text: str) -> str:
    """``text`` with SDPs, ICE passwords and credential values replaced."""
    if "v=0" in text:
        text = _SDP.sub(lambda m: f"<SDP of {m[0].count(chr(10)) + 1} lines redacted>", text)
    if "ice-pwd" in text:
        text = _ICE_PWD.sub(r"\1" + REDACTED, text)
    return _SECRET.sub(lambda m: f"{m[1]}{m[2]}{m[3]}{REDACTED}", text)


class RedactSecrets(logging.Filter):
    """Rewrites each record's message with :func:`redact` (never drops a record)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a bad format string: keep the raw parts, redacted
            message = f"{record.msg!r} {record.args!r}"
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, ()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ``time`` (UTC, ISO 8601), ``level``, ``logger``,
    ``message``, and ``exc`` when a traceback is attached."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = datetime.datetime.fromtimestamp(record.created, datetime.UTC)
        out = {
            "time": stamp.isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            out["exc"] = redact(self.formatException(record.exc_info))
        return json.dumps(out, ensure_ascii=False)


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup(level: str, fmt: str = "text", stream: TextIO | None = None) -> logging.Handler:
    """Send log records at ``level`` and above to ``stream`` (stderr) as ``fmt``
    (``text`` or ``json``), secrets redacted; returns the handler.

    Replaces the handlers a previous call installed.
    """
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.addFilter(RedactSecrets())
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "_dhtsignal", False)]:
        root.removeHandler(old)
    handler._dhtsignal = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    set_level(level)
    return handler


def set_level(level: str) -> None:
    """Change the level of the running process (the WebRTC stack stays at warning unless
    ``level`` is ``debug``)."""
    numeric = logging.getLevelName(level.upper())
    logging.getLogger().setLevel(numeric)
    for name in CHATTY:
        logging.getLogger(name).setLevel(numeric if numeric <= logging.DEBUG else logging.WARNING)


__all__ = ["JsonFormatter", "RedactSecrets", "redact", "set_level", "setup"]
