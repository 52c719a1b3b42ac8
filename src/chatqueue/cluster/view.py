"""What the request router sees of the replicas, shared with the front in the same process (the
handle's router runs there): /load, /health and /metrics read the figures the router ranks by.

NOTE: a module of its own because Serve pickles a request router's module by value: a registry
kept in router.py would be a copy, apart from the one the front reads."""

from __future__ import annotations

from typing import Protocol

from chatqueue.cluster.stats import ReplicaStats


class ReplicaView(Protocol):
    def replica_stats(self) -> list[tuple[str, ReplicaStats | None]]: ...


_views: dict[str, ReplicaView] = {}


def publish(app_name: str, view: ReplicaView) -> None:
    _views[app_name] = view


def replicas_of(app_name: str) -> list[tuple[str, ReplicaStats | None]]:
    """Every replica the app's router routes to now, with its last figures (None: none yet)."""
    view = _views.get(app_name)
    return view.replica_stats() if view is not None else []
