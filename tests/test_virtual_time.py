"""The virtual-time loop that the adapter's timing tests run on (:mod:`virtual_time`)."""

from __future__ import annotations

import asyncio
import time

import pytest
from virtual_time import run

from dhtsignal.errors import SimulationStalled


def test_sleep_takes_no_real_time() -> None:
    async def main() -> float:
        loop = asyncio.get_running_loop()
        before = loop.time()
        await asyncio.sleep(1000)
        return loop.time() - before

    started = time.monotonic()
    advanced = run(main())
    assert time.monotonic() - started < 1.0
    assert advanced == pytest.approx(1000.0)


def test_stall_is_an_error_not_a_hang() -> None:
    async def never() -> None:
        await asyncio.get_running_loop().create_future()

    with pytest.raises(SimulationStalled):
        run(never())


def test_time_limit_stops_runaway_simulation() -> None:
    async def forever() -> None:
        for _ in range(10**9):
            await asyncio.sleep(60)

    with pytest.raises(SimulationStalled, match="limit"):
        run(forever(), time_limit=3600.0)
