"""A virtual-time asyncio event loop: a test tool for the asyncio adapter's timing.

Theory of operation
-------------------
The simulator (:mod:`dhtsignal.testing.simnet`) needs no event loop: it drives the
sans-I/O nodes on a clock of its own. Some tests are about the asyncio side itself,
though: that :class:`~dhtsignal.aio.node.DhtNode` arms its one ``call_at`` timer so
that every retry leaves exactly when the core wants it to. They run on this loop.

:class:`VirtualTimeLoop` is an ordinary ``asyncio.SelectorEventLoop`` with two changes.
:meth:`VirtualTimeLoop.time` returns a virtual clock, and the loop's selector
(:class:`_VirtualSelector`) never sleeps: it polls the real file descriptors (the loop's
self-pipe) with a zero timeout, and when nothing is ready it *advances the virtual clock*
by the timeout the loop asked for, which is exactly the delay until the earliest timer.
So every ``call_later``, ``asyncio.sleep`` and ``wait_for`` fires as soon as the callbacks
before it have run, and ``await asyncio.sleep(3600)`` returns at once in real time. If
the loop would wait forever (nothing ready, no timer) it raises
:class:`~dhtsignal.errors.SimulationStalled` instead of hanging, and the same error when
virtual time would pass an optional ``time_limit``. :func:`run` is ``asyncio.run`` on it.
"""

from __future__ import annotations

import asyncio
import math
import selectors
from collections.abc import Coroutine, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

from dhtsignal.errors import SimulationStalled

if TYPE_CHECKING:
    from _typeshed import FileDescriptorLike

T = TypeVar("T")

#: Real seconds the loop waits for a thread to wake it before declaring a stall.
IDLE_GRACE = 0.2


class _VirtualSelector(selectors.BaseSelector):
    """Delegates registration to a real selector; never blocks in :meth:`select`."""

    def __init__(self, loop: VirtualTimeLoop) -> None:
        self._loop = loop
        self._real = selectors.DefaultSelector()

    def register(
        self, fileobj: FileDescriptorLike, events: int, data: Any = None
    ) -> selectors.SelectorKey:
        return self._real.register(fileobj, events, data)

    def unregister(self, fileobj: FileDescriptorLike) -> selectors.SelectorKey:
        return self._real.unregister(fileobj)

    def modify(
        self, fileobj: FileDescriptorLike, events: int, data: Any = None
    ) -> selectors.SelectorKey:
        return self._real.modify(fileobj, events, data)

    def get_map(self) -> Mapping[FileDescriptorLike, selectors.SelectorKey]:
        return self._real.get_map()

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        ready = self._real.select(0)
        if ready:
            return ready
        if timeout is None:
            # Only another thread (call_soon_threadsafe) could wake us now: give it a moment.
            ready = self._real.select(IDLE_GRACE)
            if ready:
                return ready
            raise SimulationStalled(
                "virtual-time loop stalled: no callback ready and no timer scheduled, so the "
                "awaited result can never arrive (a future nobody resolves?)"
            )
        if timeout > 0:
            self._loop.advance(timeout)
        return []

    def close(self) -> None:
        self._real.close()


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """An event loop whose clock is virtual and jumps to the next timer when idle.

    :param time_limit: raise :class:`SimulationStalled` rather than advance virtual time
        past this (None: no limit).
    """

    def __init__(self, time_limit: float | None = None) -> None:
        self._vnow = 0.0
        self.time_limit = time_limit
        super().__init__(_VirtualSelector(self))

    def time(self) -> float:
        """The virtual clock, seconds (0 at creation)."""
        return self._vnow

    def advance(self, seconds: float) -> None:
        """Move the virtual clock forward by ``seconds`` (at least one ulp).

        :raises SimulationStalled: past ``time_limit``.
        """
        new = self._vnow + seconds
        if new <= self._vnow:
            new = math.nextafter(self._vnow, math.inf)  # too small to register: one ulp
        if self.time_limit is not None and new > self.time_limit:
            raise SimulationStalled(
                f"virtual time would pass its limit of {self.time_limit:.1f} s "
                f"(now {self._vnow:.3f} s, next timer in {seconds:.3f} s)"
            )
        self._vnow = new


def run(coro: Coroutine[Any, Any, T], *, time_limit: float | None = None) -> T:
    """Run ``coro`` to completion on a fresh virtual-time loop and close it.

    :param coro: the coroutine.
    :param time_limit: see :class:`VirtualTimeLoop`.
    :returns: what ``coro`` returns.
    """
    with asyncio.Runner(loop_factory=lambda: VirtualTimeLoop(time_limit)) as runner:
        return runner.run(coro)
