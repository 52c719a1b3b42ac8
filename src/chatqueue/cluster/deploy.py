"""The cluster's Serve applications. `build_app` (for `serve run` and Serve config files): a
front deployment (the HTTP app, behind Serve's HTTP proxy) bound to the replicas (one ChatQueue
each) with the cluster's request router. `serve_cluster` (for `chatqueue serve --replicas N`):
the replicas alone, and the front in this process, served by uvicorn as one server is.

NOTE: why the CLI's front is not a deployment. Behind Serve's proxy every SSE chunk crosses one
more pair of Python processes (front -> proxy) as a Ray message of its own: at 32 streams that
cost the front and the proxy ~2 ms of CPU a token together, 16x the plain server's whole cost.
In this process the front writes its streams to the sockets itself, and a SIGTERM drain answers
new requests with chatqueue's own 503 until the streams in flight are done."""

from __future__ import annotations

import logging
import os
from typing import Any

import ray
from ray import serve
from ray.serve import Application

from chatqueue.cluster import scaling
from chatqueue.cluster.checks import alive_nodes, check_history
from chatqueue.cluster.front import Front
from chatqueue.cluster.link import new_secret
from chatqueue.cluster.queue import ClusterQueue
from chatqueue.cluster.replica import ChatQueueReplica
from chatqueue.cluster.router import ChatQueueRouter
from chatqueue.config import Settings
from chatqueue.server import serve as server

log = logging.getLogger(__name__)

APP_NAME = "chatqueue"
REPLICA_DEPLOYMENT = "ChatQueueReplica"
# NOTE: how old a replica's figures may be when the router ranks by them (plus the controller's
# broadcast, a control-loop tick of 0.1 s); the router counts what it sent meanwhile itself.
STATS_PERIOD_S = 0.5
STATS_TIMEOUT_S = 5.0
HEALTH_CHECK_PERIOD_S = 2.0
FRONT_MAX_ONGOING = 100_000  # every open stream is one; admission is the replicas'
# NOTE: Serve logs a line for every call a replica answers (a placement, a channel, /load's
# describe), which Ray then forwards to the driver's console: ~10% of the front process's CPU at
# 8 streams. The front's own access log (uvicorn's) still says what was asked.
NO_ACCESS_LOG = {"enable_access_log": False}


def build_app(args: dict[str, Any]) -> Application:
    """`serve run chatqueue.cluster:build_app replicas=2 engine=mock`, or a Serve config's
    `import_path: chatqueue.cluster:build_app` with `args:`: Settings fields by name
    (CHATQUEUE_* environment variables too, below the args)."""
    return app_for(Settings(**args))


def app_for(settings: Settings) -> Application:
    """The front deployment over the replicas (Serve's proxy routes HTTP to the front). The
    secret of the front's lines to the replicas (`link`) is made here, bound into both."""
    front = serve.deployment(
        name="Front",
        num_replicas=1,
        ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=FRONT_MAX_ONGOING,
        graceful_shutdown_timeout_s=settings.shutdown_timeout,
        graceful_shutdown_wait_loop_s=0.5,
        logging_config=NO_ACCESS_LOG,
    )(Front)
    secret = _link_secret(settings)
    return front.bind(settings, replicas_for(settings, secret), secret)


def _link_secret(settings: Settings) -> bytes | None:
    return new_secret() if settings.cluster_link == "on" else None


def replicas_for(settings: Settings, link_secret: bytes | None) -> Application:
    """The replicas' deployment, with the cluster's request router; `link_secret`: what a
    front's line must prove (None: no lines)."""
    replica = serve.deployment(
        name=REPLICA_DEPLOYMENT,
        ray_actor_options={"num_cpus": settings.replica_cpus, "num_gpus": _gpus(settings)},
        # NOTE: admission is the ChatQueue's; Serve's own cap only has to stay out of its way
        # (a front's waves, aborts and channel, and describe calls, are each one).
        max_ongoing_requests=2 * (settings.max_concurrent + settings.max_queue_size) + 16,
        graceful_shutdown_timeout_s=settings.shutdown_timeout,
        graceful_shutdown_wait_loop_s=0.5,
        health_check_period_s=HEALTH_CHECK_PERIOD_S,
        logging_config=NO_ACCESS_LOG,
        request_router_config={
            "request_router_class": ChatQueueRouter,
            "request_routing_stats_period_s": STATS_PERIOD_S,
            "request_routing_stats_timeout_s": STATS_TIMEOUT_S,
        },
        **_scaling(settings),
    )(ChatQueueReplica)
    return replica.bind(settings, link_secret)


def _scaling(settings: Settings) -> dict[str, Any]:
    """A fixed number of replicas, or Serve autoscaling driven by queue depth: the replicas
    report their running and waiting requests (`scaling`), and a target of `max_concurrent` a
    replica adds replicas while requests wait and removes them while slots stand empty."""
    if settings.max_replicas is None:
        return {"num_replicas": settings.replicas or 1}
    return {
        "autoscaling_config": {
            "min_replicas": settings.min_replicas,
            "max_replicas": settings.max_replicas,
            "target_ongoing_requests": settings.max_concurrent,
            "upscale_delay_s": 5.0,
            "downscale_delay_s": 60.0,
            "policy": {"policy_function": scaling.POLICY},
        }
    }


def _gpus(settings: Settings) -> float:
    if settings.replica_gpus is not None:
        return settings.replica_gpus
    has_gpus = ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0
    return 1.0 if settings.engine == "hf" and has_gpus else 0.0


def serve_cluster(settings: Settings) -> None:
    """Start a local Ray (or join --ray-address), deploy the replicas, and serve the front on
    --host/--port from this process. SIGTERM/SIGINT drain it as one server drains (new requests
    get 503 `shutting_down`, in-flight streams get --shutdown-timeout), then the replicas and
    the Ray this started stop."""
    is_local = settings.ray_address is None
    if is_local:
        wanted = (settings.replicas or settings.max_replicas or 1) * settings.replica_cpus
        ray.init(num_cpus=max(os.cpu_count() or 1, int(wanted + 0.999)), include_dashboard=False)
    else:
        ray.init(address=settings.ray_address)
    try:
        check_history(settings, alive_nodes())
        serve.start(proxy_location="Disabled")
        secret = _link_secret(settings)
        app = replicas_for(settings, secret)
        serve.run(app, name=APP_NAME, route_prefix=None, blocking=False)
        handle = serve.get_deployment_handle(REPLICA_DEPLOYMENT, app_name=APP_NAME)
        server.serve(settings, chat_queue=ClusterQueue(handle, settings, APP_NAME, secret))
        serve.delete(APP_NAME)
    finally:
        if is_local:
            serve.shutdown()
        ray.shutdown()
