"""The front: the ingress deployment that serves the single server's app (`create_app`: the
OpenAI routes, /chat and the page, /load, /health, /metrics) over a `ClusterQueue`, whose
requests go to the replicas through Serve's handle and the cluster's request router. The chat
history lives here, so the replicas never touch it."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from ray import serve
from ray.serve.handle import DeploymentHandle

from chatqueue.cluster.checks import alive_nodes, check_history
from chatqueue.cluster.queue import ClusterQueue
from chatqueue.config import Settings
from chatqueue.server.app import create_app


@serve.ingress()
class Front:
    def __init__(
        self, settings: Settings, replicas: DeploymentHandle[Any], link_secret: bytes | None
    ) -> None:
        check_history(settings, alive_nodes())
        self._settings = settings
        app_name = serve.get_replica_context().app_name
        self._queue = ClusterQueue(replicas, settings, app_name, link_secret)

    def __serve_build_asgi_app__(self) -> FastAPI:
        return create_app(self._settings, chat_queue=self._queue)
