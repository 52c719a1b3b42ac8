"""Serve autoscaling for the replicas (`--min-replicas/--max-replicas`), driven by the requests
the replicas hold, running and waiting, as each reports them (`record_autoscaling_stats`).

NOTE: why not Serve's own count. Serve counts a replica's open calls, and a request placed in a
wave has none of its own (a wave is one short call, and a front's channel one long call for all
its requests there), so that count no longer says how busy a replica is. The rule is Serve's
default one on the replicas' figures: `target_ongoing_requests` (the slots a replica has) a
replica; Serve's wrapper then applies the bounds and the up- and downscale delays."""

from __future__ import annotations

from typing import Any

RUNNING = "running"
WAITING = "waiting"
POLICY = "chatqueue.cluster.scaling:replicas_for_queue_depth"


def desired_replicas(held: float, per_replica: float) -> float:
    """Replicas for `held` requests, `per_replica` each; 0 while none is held (the bounds
    keep the minimum)."""
    return held / per_replica if per_replica > 0 else 0.0


def replicas_for_queue_depth(ctx: Any) -> tuple[float, dict[str, Any]]:
    """Serve's policy function: `ctx` is a `ray.serve.config.AutoscalingContext`."""
    metrics = ctx.aggregated_metrics or {}
    held = sum(metrics.get(RUNNING, {}).values()) + sum(metrics.get(WAITING, {}).values())
    if not metrics and ctx.current_num_replicas > 0:
        return ctx.target_num_replicas, {}  # nothing reported yet: stay
    return desired_replicas(held, ctx.config.get_target_ongoing_requests()), {}
