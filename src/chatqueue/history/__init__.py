"""Conversation history stores: what each chat said and heard, behind one interface (SQLite, Redis,
memory). Stores only: the chat service above them (`chat/`) decides what to keep."""

from chatqueue.history.store import HistoryStore, open_store
from chatqueue.history.types import ChatParams, Feedback, Turn

__all__ = ["ChatParams", "Feedback", "HistoryStore", "Turn", "open_store"]
