"""A replica's view of which fronts are still there (`cluster/leases.py`), on given times."""

from __future__ import annotations

from chatqueue.cluster.leases import Leases


def test_a_front_silent_for_longer_than_a_lease_has_expired_once() -> None:
    leases = Leases(lease_s=10.0)
    leases.heard("a", now=100.0)
    leases.heard("b", now=105.0)
    assert leases.expired({"a", "b"}, now=110.0) == []  # a lease is 10 s: not past it yet
    assert leases.expired({"a", "b"}, now=110.5) == ["a"]
    # forgotten once reported: its requests are being aborted, not reported again
    assert leases.expired({"a", "b"}, now=111.0) == []
    assert leases.expired({"a", "b"}, now=115.5) == ["b"]


def test_renewing_keeps_a_front_and_a_front_never_heard_from_is_not_expired() -> None:
    leases = Leases(lease_s=10.0)
    for t in range(0, 60, 2):
        leases.heard("a", now=float(t))
        assert leases.expired({"a", "never"}, now=float(t) + 1.0) == []


def test_only_the_fronts_with_requests_here_can_expire() -> None:
    leases = Leases(lease_s=10.0)
    leases.heard("a", now=0.0)
    leases.heard("b", now=0.0)
    assert leases.expired({"b"}, now=20.0) == ["b"]  # "a" has no request here
    leases.forget_all_but({"b"})
    leases.heard("a", now=30.0)  # back with a request: a new lease from now
    assert leases.expired({"a"}, now=35.0) == []
    assert leases.expired({"a"}, now=40.5) == ["a"]
