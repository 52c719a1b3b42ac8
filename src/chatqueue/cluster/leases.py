"""Which fronts a replica still hears from: a front renews its lease on every replica where it
has requests, and a replica aborts the requests of a front it has not heard from for a lease.

NOTE: why. A front that stops cleanly cancels its channels and the replicas abort its requests;
one killed outright (SIGKILL, a crash) cancels nothing, and Ray does not end a streaming call
whose caller died (checked on Ray 2.60: the replica's side ran on for 10 s and more), so its
requests would run to their end holding their slots. Plain code, no Ray."""

from __future__ import annotations

from collections.abc import Iterable

LEASE_S = 10.0  # a front silent this long is gone
RENEW_EVERY_S = 2.0  # how often a front renews, where it has requests


class Leases:
    def __init__(self, lease_s: float = LEASE_S) -> None:
        self._lease_s = lease_s
        self._heard: dict[str, float] = {}  # by front: when it last called (monotonic)

    def heard(self, front: str, now: float) -> None:
        self._heard[front] = now

    def expired(self, fronts: Iterable[str], now: float) -> list[str]:
        """Of `fronts` (those with requests here), those silent for longer than a lease; they
        are forgotten (a front heard from again starts a new lease). A front never heard from
        has not expired."""
        gone = [f for f in fronts if now - self._heard.get(f, now) > self._lease_s]
        for front in gone:
            del self._heard[front]
        return gone

    def forget_all_but(self, fronts: Iterable[str]) -> None:
        """Drop the fronts with no request here any more."""
        keep = set(fronts)
        self._heard = {f: t for f, t in self._heard.items() if f in keep}
