"""What a cluster refuses to start with, said before anything serves."""

from __future__ import annotations

from chatqueue.config import Settings


class ClusterConfigError(ValueError):
    """A setting that cannot work on this cluster; the message says what to do instead."""


def check_history(settings: Settings, num_nodes: int) -> None:
    """SQLite (the default) keeps conversations in a file on one machine: on a cluster of
    several nodes the front may be restarted on another one, with another file."""
    if num_nodes > 1 and settings.history == "sqlite":
        raise ClusterConfigError(
            f"This Ray cluster has {num_nodes} nodes, and --history sqlite keeps conversations "
            "in a file on one machine; a front restarted on another node would not see them. "
            "Use --history redis://host:port/db (one Redis every node reaches), and give every "
            "node the same CHATQUEUE_SESSION_SECRET."
        )


def alive_nodes() -> int:
    import ray

    return sum(1 for node in ray.nodes() if node.get("Alive"))
