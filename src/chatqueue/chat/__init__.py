"""The chat service over the queue: a conversation's history -> a prompt that fits the context,
the reply streamed and recorded (complete or interrupted)."""

from chatqueue.chat.service import ChatService, Reply

__all__ = ["ChatService", "Reply"]
