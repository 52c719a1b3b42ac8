"""Pure Python: request states, the bounded fair waiting queue, admission. No I/O, no torch."""

from chatqueue.scheduler.drain import DrainRate
from chatqueue.scheduler.request import Request, RequestState
from chatqueue.scheduler.scheduler import SchedulePlan, Scheduler
from chatqueue.scheduler.waiting import WaitingQueue

__all__ = ["DrainRate", "Request", "RequestState", "SchedulePlan", "Scheduler", "WaitingQueue"]
