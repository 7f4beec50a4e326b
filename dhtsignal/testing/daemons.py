"""A ``dhtsignal`` daemon as an OS process, for benchmarks and test harnesses.

The process's stdout lines are read by a thread (the ready line comes first); its stderr
goes to a file. It is ended by its PID only: :meth:`DaemonProcess.stop` sends SIGTERM
and, if it is still running after a grace period, SIGKILL; :meth:`DaemonProcess.kill`
sends SIGKILL at once.
"""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import subprocess
import sys
import threading
from pathlib import Path


class DaemonProcess:
    """``python -m dhtsignal ARGS`` with its stdout read by a thread.

    :param args: arguments after ``python -m dhtsignal``.
    :param err: the file its stderr goes to.
    :param env: its environment (None: ours).
    """

    def __init__(self, args: list[str], err: Path, env: dict[str, str] | None = None) -> None:
        self.args = args
        self.err_path = err
        self._err = open(err, "wb")  # noqa: SIM115 (closed in _reap())
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "dhtsignal", *args],
            stdout=subprocess.PIPE,
            stderr=self._err,
            stdin=subprocess.DEVNULL,
            env=env,
            text=True,
        )
        self.pid = self.popen.pid
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            self._lines.put(line.rstrip("\n"))
        self._lines.put(None)

    def stderr(self) -> str:
        """What it wrote to stderr so far."""
        return self.err_path.read_text(errors="replace")

    def ready(self, timeout: float) -> dict[str, str]:
        """Wait for its ready line (``ready KIND key=value ...``); returns its fields.

        :raises RuntimeError: no ready line within ``timeout`` seconds, or it exited or
            wrote something else first (the message holds the end of its stderr).
        """
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise RuntimeError(f"{self.err_path.name}: no ready line in {timeout} s") from None
        if line is None or not line.startswith("ready "):
            tail = self.stderr()[-2000:]
            raise RuntimeError(f"{self.err_path.name}: not ready ({line!r}); stderr:\n{tail}")
        return dict(w.split("=", 1) for w in line.split()[2:])

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM by PID (if still running), SIGKILL after ``grace`` seconds; reap."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(grace)
        self.kill()

    def kill(self) -> None:
        """SIGKILL by PID (if still running) and reap."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(10)
        if self.popen.stdout is not None:
            self.popen.stdout.close()
        self._err.close()
