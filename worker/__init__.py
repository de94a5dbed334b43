"""gridq workers: the @task decorator and the worker process."""

try:
    from worker.registry import task
except ImportError as exc:  # a module of the user's named like ours, found first on sys.path
    import importlib.util
    import os

    _path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "client", "shadowed.py")
    _spec = importlib.util.spec_from_file_location("gridq_shadowed", _path)
    _shadowed = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_shadowed)
    raise _shadowed.explain(exc, "worker") from exc

__all__ = ["task"]
