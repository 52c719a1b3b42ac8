"""The cluster's Serve application: a front (the HTTP app) bound to the replicas (one ChatQueue
each) with the cluster's request router; `build_app` for `serve run` and Serve config files,
`serve_cluster` for `chatqueue serve --replicas N`."""

from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Any

import ray
from ray import serve
from ray.serve import Application

from chatqueue.cluster.checks import alive_nodes, check_history
from chatqueue.cluster.front import Front
from chatqueue.cluster.replica import ChatQueueReplica
from chatqueue.cluster.router import ChatQueueRouter
from chatqueue.config import Settings

log = logging.getLogger(__name__)

APP_NAME = "chatqueue"
# NOTE: how old a replica's figures may be when the router ranks by them (plus the controller's
# broadcast, a control-loop tick of 0.1 s); the router counts what it sent meanwhile itself.
STATS_PERIOD_S = 0.5
STATS_TIMEOUT_S = 5.0
HEALTH_CHECK_PERIOD_S = 2.0
FRONT_MAX_ONGOING = 100_000  # every open stream is one; admission is the replicas'


def build_app(args: dict[str, Any]) -> Application:
    """`serve run chatqueue.cluster:build_app replicas=2 engine=mock`, or a Serve config's
    `import_path: chatqueue.cluster:build_app` with `args:`: Settings fields by name
    (CHATQUEUE_* environment variables too, below the args)."""
    return app_for(Settings(**args))


def app_for(settings: Settings) -> Application:
    replica = serve.deployment(
        name="ChatQueueReplica",
        ray_actor_options={"num_cpus": settings.replica_cpus, "num_gpus": _gpus(settings)},
        # NOTE: admission is the ChatQueue's; Serve's own cap only has to stay out of its way
        # (refusals, which end at once, and describe calls come on top of the places).
        max_ongoing_requests=2 * (settings.max_concurrent + settings.max_queue_size) + 16,
        graceful_shutdown_timeout_s=settings.shutdown_timeout,
        graceful_shutdown_wait_loop_s=0.5,
        health_check_period_s=HEALTH_CHECK_PERIOD_S,
        request_router_config={
            "request_router_class": ChatQueueRouter,
            "request_routing_stats_period_s": STATS_PERIOD_S,
            "request_routing_stats_timeout_s": STATS_TIMEOUT_S,
        },
        **_scaling(settings),
    )(ChatQueueReplica)
    front = serve.deployment(
        name="Front",
        num_replicas=1,
        ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=FRONT_MAX_ONGOING,
        graceful_shutdown_timeout_s=settings.shutdown_timeout,
        graceful_shutdown_wait_loop_s=0.5,
    )(Front)
    return front.bind(settings, replica.bind(settings))


def _scaling(settings: Settings) -> dict[str, Any]:
    """A fixed number of replicas, or Serve autoscaling driven by queue depth: Serve counts a
    replica's ongoing requests (running + waiting), and a target of `max_concurrent` adds
    replicas while requests wait and removes them while slots stand empty."""
    if settings.max_replicas is None:
        return {"num_replicas": settings.replicas or 1}
    return {
        "autoscaling_config": {
            "min_replicas": settings.min_replicas,
            "max_replicas": settings.max_replicas,
            "target_ongoing_requests": settings.max_concurrent,
            "upscale_delay_s": 5.0,
            "downscale_delay_s": 60.0,
        }
    }


def _gpus(settings: Settings) -> float:
    if settings.replica_gpus is not None:
        return settings.replica_gpus
    has_gpus = ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0
    return 1.0 if settings.engine == "hf" and has_gpus else 0.0


def serve_cluster(settings: Settings) -> None:
    """Start a local Ray (or join --ray-address), serve the app on --host/--port, and on
    SIGTERM/SIGINT drain it (in-flight streams get --shutdown-timeout) and stop."""
    is_local = settings.ray_address is None
    if is_local:
        wanted = (settings.replicas or settings.max_replicas or 1) * settings.replica_cpus
        ray.init(num_cpus=max(os.cpu_count() or 1, int(wanted + 0.999)), include_dashboard=False)
    else:
        ray.init(address=settings.ray_address)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        check_history(settings, alive_nodes())
        serve.start(http_options={"host": settings.host, "port": settings.port})
        serve.run(app_for(settings), name=APP_NAME, route_prefix="/", blocking=False)
        log.info("serving on http://%s:%s", settings.host, settings.port)
        stop.wait()
        log.info("draining for up to %.0f s", settings.shutdown_timeout)
        serve.delete(APP_NAME)
    finally:
        if is_local:
            serve.shutdown()
        ray.shutdown()
