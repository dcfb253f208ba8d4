"""Pure folds of the event log into the state the API and the scheduler read."""

from projections.fold import apply, apply_event, fold
from projections.state import JobEntry, PendingIndex, QueueState, User

__all__ = ["JobEntry", "PendingIndex", "QueueState", "User", "apply", "apply_event", "fold"]
