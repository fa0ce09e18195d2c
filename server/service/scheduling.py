"""Who generates now (up to the engine's slots at once), who waits, who is turned away."""

from __future__ import annotations

import asyncio
from collections import deque


class QueueFull(RuntimeError):
    pass


class ShuttingDown(RuntimeError):
    pass


class GenerationQueue:
    """At most ``max_running`` generations run, at most ``max_queue`` wait in FIFO order.

    A request is admitted (``admit``) when it arrives, before its response starts, so a full queue is
    still a proper 429; the place it holds becomes a turn in line when its response runs (``enter``)
    or is given back if it never runs (``Generation.abandon``). ``close`` (shutdown) turns every
    waiter away with ``ShuttingDown``.
    """

    def __init__(self, max_queue: int, max_running: int = 1) -> None:
        self.max_queue, self.max_running = max_queue, max_running
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
        if self.running + self.waiting >= self.max_running + self.max_queue:
            raise QueueFull(f"The server is busy: {self.waiting} requests are already waiting. Retry later.")
        self.admitted += 1

    def enter(self) -> asyncio.Future:
        """Turn an admission into a place in line: a future that is done when it is this request's turn."""
        self.admitted -= 1
        if self.closed:
            raise ShuttingDown("The server is shutting down.")
        turn = asyncio.get_running_loop().create_future()
        if self.running < self.max_running and not self._waiters:
            self.running += 1
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
                turn.set_result(None)  # the count stays: the turn passes directly
                return
        self.running -= 1

    def close(self) -> None:
        self.closed = True
        while self._waiters:
            turn = self._waiters.popleft()
            if not turn.done():
                turn.set_exception(ShuttingDown("The server is shutting down."))
