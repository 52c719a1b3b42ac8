"""The embedding API: ChatQueue (admission, the request stream) and the builder that turns Settings
into a runner and a queue. Knows no HTTP."""

from chatqueue.api.chat_queue import ChatQueue, FinishInfo, LoadInfo
from chatqueue.api.service import QueueService
from chatqueue.api.stream import RequestStream

__all__ = ["ChatQueue", "FinishInfo", "LoadInfo", "QueueService", "RequestStream"]
