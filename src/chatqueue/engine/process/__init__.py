"""The model in its own process: `ProcessRunner` in the server, `child` in the model process, and
the typed messages between them."""

from chatqueue.engine.process.runner import ModelLoadError, ProcessRunner

__all__ = ["ModelLoadError", "ProcessRunner"]
