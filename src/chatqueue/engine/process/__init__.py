"""The model in its own process: `ProcessRunner` in the server, `child` in the model process, and
the typed messages between them."""

from chatqueue.engine.process.messages import Load, Preload
from chatqueue.engine.process.runner import ModelLoadError, ModelProcess, ProcessRunner

__all__ = ["Load", "ModelLoadError", "ModelProcess", "Preload", "ProcessRunner"]
