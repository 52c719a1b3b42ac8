"""Conversation history: what each chat session said and heard, behind one store interface."""

from chatqueue.sessions.store import HistoryStore, open_store
from chatqueue.sessions.types import ChatParams, Feedback, Turn

__all__ = ["ChatParams", "Feedback", "HistoryStore", "Turn", "open_store"]
