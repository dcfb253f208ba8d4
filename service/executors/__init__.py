"""Executors: what turns committed dispatches into running processes."""

from service.executors.local import LocalExecutor

__all__ = ["LocalExecutor"]
