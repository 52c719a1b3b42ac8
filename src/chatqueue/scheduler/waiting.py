"""The waiting queue: higher priority first; within a priority, users take turns (round-robin).
Requests put back at the front (preempted, to resume) come before all of them."""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Iterator
from typing import Generic, TypeVar

from chatqueue.scheduler.request import Request

R = TypeVar("R", bound=Request)


class _Level(Generic[R]):
    """One priority level: a rotation of users, each with a FIFO of requests."""

    def __init__(self) -> None:
        self.users: OrderedDict[str, deque[R]] = OrderedDict()

    def __len__(self) -> int:
        return sum(len(q) for q in self.users.values())

    def push(self, req: R) -> None:
        self.users.setdefault(req.user, deque()).append(req)

    def pop(self) -> R:
        user, q = next(iter(self.users.items()))
        req = q.popleft()
        if q:
            self.users.move_to_end(user)  # served: to the back of the rotation
        else:
            del self.users[user]
        return req

    def remove(self, req: R) -> None:
        q = self.users[req.user]
        q.remove(req)
        if not q:
            del self.users[req.user]

    def in_order(self) -> Iterator[R]:
        """The order `pop` would hand requests out in: round k takes each user's k-th request."""
        queues = list(self.users.values())
        depth = max((len(q) for q in queues), default=0)
        for k in range(depth):
            for q in queues:
                if k < len(q):
                    yield q[k]


class WaitingQueue(Generic[R]):
    def __init__(self) -> None:
        self._front: deque[R] = deque()
        self._levels: dict[int, _Level[R]] = {}
        self._count = 0
        self._per_user: dict[str, int] = {}

    def __len__(self) -> int:
        return self._count

    def count_for(self, key: str) -> int:
        """Waiting requests counted as `key` (a request's `counted_as`)."""
        return self._per_user.get(key, 0)

    def push(self, req: R) -> None:
        self._levels.setdefault(req.priority, _Level[R]()).push(req)
        self._count += 1
        self._per_user[req.counted_as] = self._per_user.get(req.counted_as, 0) + 1

    def push_front(self, req: R) -> None:
        """Before everyone else (the last one put back goes first). It does not count against
        its user's cap: it had started, and the server put it back."""
        self._front.appendleft(req)
        self._count += 1

    def peek(self) -> R:
        return next(self.in_order())

    def pop(self) -> R:
        if self._front:
            self._count -= 1
            return self._front.popleft()
        level_key = max(self._levels)
        level = self._levels[level_key]
        req = level.pop()
        if not level.users:
            del self._levels[level_key]
        self._forget(req)
        return req

    def remove(self, req: R) -> None:
        if req in self._front:
            self._front.remove(req)
            self._count -= 1
            return
        level = self._levels[req.priority]
        level.remove(req)
        if not level.users:
            del self._levels[req.priority]
        self._forget(req)

    def in_order(self) -> Iterator[R]:
        yield from self._front
        for key in sorted(self._levels, reverse=True):
            yield from self._levels[key].in_order()

    def _forget(self, req: R) -> None:
        self._count -= 1
        left = self._per_user[req.counted_as] - 1
        if left:
            self._per_user[req.counted_as] = left
        else:
            del self._per_user[req.counted_as]
