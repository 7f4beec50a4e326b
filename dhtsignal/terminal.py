"""Remote text made safe for one terminal line (shared by the commands that print messages)."""

from __future__ import annotations

import asyncio
import re
import sys
from collections.abc import AsyncIterator

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\\]")
_ESCAPES = {"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def one_line(text: str) -> str:
    """``text`` on one line and harmless to a terminal: backslash, newline, carriage
    return, tab and other control characters (escape sequences) are written as escapes."""
    return _CONTROL.sub(lambda m: _ESCAPES.get(m[0]) or f"\\x{ord(m[0]):02x}", text)


def text_of(message: bytes | str) -> str:
    """A received message as text (bytes decoded as UTF-8, bad bytes replaced)."""
    return message if isinstance(message, str) else message.decode("utf-8", "replace")


async def stdin_lines() -> AsyncIterator[str]:
    """Lines of standard input without their newline, read without blocking the loop
    (a regular file, which never blocks for long, is read directly)."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    try:
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    except (ValueError, OSError):
        for line in sys.stdin:
            yield line.rstrip("\n")
        return
    while raw := await reader.readline():
        yield raw.decode("utf-8", "replace").rstrip("\n")


__all__ = ["one_line", "stdin_lines", "text_of"]
