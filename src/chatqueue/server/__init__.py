"""HTTP: the FastAPI app, OpenAI routes, the chat stream, load/health/metrics, SSE."""

from chatqueue.server.app import create_app

__all__ = ["create_app"]
