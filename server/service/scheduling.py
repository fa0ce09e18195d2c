"""Batch size 1 as a queue: who generates now, who waits, who is turned away."""

from __future__ import annotations

import asyncio
from collections import deque


class QueueFull(RuntimeError):
    pass


class ShuttingDown(RuntimeError):
    pass


class GenerationQueue:
    """Batch size 1: one generation runs, at most ``max_queue`` wait in FIFO order.

    A request is admitted (``admit``) when it arrives, before its response starts, so a full queue is
    still a proper 429; the place it holds becomes a turn in line when its response runs (``enter``)
    or is given back if it never runs (``Generation.abandon``). ``close`` (shutdown) turns every
    waiter away with ``ShuttingDown``.
    """

    def __init__(self, max_queue: int) -> None:
        self.max_queue = max_queue
        self.running = 0
        self.closed = False
        self.admitted = 0  # admitted, response not started yet
        self._waiters: deque[asyncio.Future] = deque()

    @property
    def waiting(self) -> int:
        return self.admitted + len(self._waiters)

    def admit(self) -> None:
        if self.closed:
            raise ShuttingDown("The server is shutting down.")
        if self.running + self.waiting >= 1 + self.max_queue:  # one generating, max_queue in line
            raise QueueFull(f"The server is busy: {self.waiting} requests are already waiting. Retry later.")
        self.admitted += 1

    def enter(self) -> asyncio.Future:
        """Turn an admission into a place in line: a future that is done when it is this request's turn."""
        self.admitted -= 1
        if self.closed:
            raise ShuttingDown("The server is shutting down.")
        turn = asyncio.get_running_loop().create_future()
        if not self.running and not self._waiters:
            self.running = 1
            turn.set_result(None)
        else:
            self._waiters.append(turn)
        return turn

    def leave(self, turn: asyncio.Future) -> None:
        """A request that gives up before generating gives its place (or its turn) back."""
        if turn in self._waiters:
            self._waiters.remove(turn)
        elif turn.done() and not turn.cancelled() and turn.exception() is None:
            self.release()

    def release(self) -> None:
        while self._waiters:
            turn = self._waiters.popleft()
            if not turn.done():
                turn.set_result(None)  # running stays 1: the turn passes directly
                return
        self.running = 0

    def close(self) -> None:
        self.closed = True
        while self._waiters:
            turn = self._waiters.popleft()
            if not turn.done():
                turn.set_exception(ShuttingDown("The server is shutting down."))
