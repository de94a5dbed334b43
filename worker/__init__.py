"""gridq workers: the @task decorator and the worker process."""

from worker.registry import task

__all__ = ["task"]
