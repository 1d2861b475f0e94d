"""Stand-ins that tests of several components share: a clock the test moves by hand, and
an aggregator sink that keeps what it is given.

Clocks are injected everywhere (STYLE.md), so a test drives time by setting ``clock.t``;
these are the two shapes the code under test calls, written once.
"""

from __future__ import annotations

from typing import Any


class ManualClock:
    """``clock()`` answers ``clock.t``; the test moves it."""

    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


class ListSink:
    """An aggregator sink (start, write, close) that appends every batch to ``got``."""

    name = "list"

    def __init__(self) -> None:
        self.got: list[Any] = []

    async def start(self) -> None:
        pass

    async def write(self, batch: Any) -> None:
        self.got.extend(batch)

    async def close(self) -> None:
        pass
