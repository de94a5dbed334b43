"""gridq-worker: run a worker process (python -m worker)."""

from __future__ import annotations

import argparse
import os
import signal
import sys

import structlog

from broker.logs import add_logging_flags, configure_logging
from broker.protocol import DEFAULT_BACKEND, WRONG_PORT
from broker.runtime import tune_gc
from worker.registry import REGISTRY, load_modules, working_directory_last
from worker.pool import PoolOptions
from worker.worker import DEFAULT_DRAIN_S, Worker, WorkerConfig

log = structlog.get_logger("worker")


def parse_resources(text: str) -> dict:
    out = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        name, sep, qty = item.partition("=")
        try:
            value = float(qty)
        except ValueError:
            value = -1.0
        if not sep or not name or value < 0:
            raise argparse.ArgumentTypeError(f"bad resource {item!r}: expected NAME=QTY with QTY >= 0")
        out[name] = int(value) if value.is_integer() else value
    return out


def task_modules(spec: str) -> list[str]:
    """The module names that ``--tasks`` gives: names (found beside the worker's working
    directory) or paths of .py files. Their directories go to the END of sys.path, never the
    front, so a file of the user's named like a library module (``client.py``) shadows nothing."""
    here = os.getcwd()
    working_directory_last()
    names = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        folder = here
        if item.endswith(".py") or os.sep in item:
            folder, item = os.path.split(os.path.abspath(item))
            item = item.removesuffix(".py")
        if folder not in sys.path and (folder != here or "" not in sys.path):
            sys.path.append(folder)
        names.append(item)
    return names


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="gridq-worker", description="Run a gridq worker.")
    p.add_argument("--broker", default=DEFAULT_BACKEND, help="broker backend endpoint")
    p.add_argument("--tasks", default="", metavar="MODULE[,MODULE...]",
                   help="modules (names, or paths of .py files) whose @task functions to serve")
    p.add_argument("--slots", type=int, default=1, metavar="N", help="tasks run at once")
    p.add_argument("--gpu", nargs="*", type=int, default=None, metavar="DEVICE", help="serve GPU tasks on these CUDA devices")
    p.add_argument("--resources", type=parse_resources, default={}, metavar="NAME=QTY[,...]", help="extra named resources")
    p.add_argument("--name", default=None, help="worker name (default HOST-PID)")
    p.add_argument("--heartbeat", type=float, default=1.0, metavar="SECONDS")
    p.add_argument("--liveness", type=int, default=3, metavar="N")
    p.add_argument("--drain-timeout", type=float, default=DEFAULT_DRAIN_S, metavar="SECONDS",
                   help="on SIGTERM, wait this long for running tasks before handing them back")
    p.add_argument("--pool", choices=("process", "thread"), default="process",
                   help="run CPU tasks in a child process per slot (isolated, every core) or on threads of the worker")
    p.add_argument("--max-tasks-per-child", type=int, default=0, metavar="N",
                   help="replace a process slot's child after it ran N tasks (0: never)")
    p.add_argument("--max-memory-per-child", type=int, default=0, metavar="MiB",
                   help="replace a process slot's child after a task leaves it over MiB of private memory (0: never)")
    p.add_argument("--broker-key", default=None, metavar="FILE", help="the broker's CURVE public key (NAME.key)")
    p.add_argument("--curve-secret", default=None, metavar="FILE", help="this worker's CURVE key pair (NAME.key_secret)")
    add_logging_flags(p)
    args = p.parse_args(argv)
    if bool(args.broker_key) != bool(args.curve_secret):
        p.error("CURVE needs both --broker-key and --curve-secret")
    if args.slots < 1 or args.heartbeat <= 0 or args.liveness < 1:
        p.error("--slots and --liveness must be >= 1 and --heartbeat > 0")
    if args.max_tasks_per_child < 0 or args.max_memory_per_child < 0:
        p.error("--max-tasks-per-child and --max-memory-per-child must be >= 0")
    if args.pool == "thread" and (args.max_tasks_per_child or args.max_memory_per_child):
        p.error("--max-tasks-per-child and --max-memory-per-child need --pool process")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    configure_logging(args.log_format, args.log_level)
    import worker.builtins  # noqa: F401  (registers the built-in tasks)

    modules = tuple(task_modules(args.tasks))  # their folders go to the END of sys.path (children inherit it)
    try:
        load_modules(list(modules))
    except Exception as exc:
        log.error("task_module_import_failed", modules=args.tasks, error=f"{type(exc).__name__}: {exc}")
        return 2
    gpu = None
    if args.gpu is not None:
        try:
            from worker.gpu import GpuPool, register_gpu_builtins

            gpu = GpuPool(args.gpu or [0])
            register_gpu_builtins()
        except Exception as exc:
            log.error("gpu_unavailable", devices=args.gpu, error=f"{type(exc).__name__}: {exc}")
            print(f"gridq-worker: --gpu {' '.join(map(str, args.gpu))}: {exc}", file=sys.stderr)
            return 2
    config = WorkerConfig(broker=args.broker, slots=args.slots, resources=args.resources, name=args.name,
                          heartbeat_s=args.heartbeat, liveness=args.liveness, drain_s=args.drain_timeout,
                          pool=args.pool, pool_options=PoolOptions(modules, args.max_tasks_per_child,
                                                                   args.max_memory_per_child))
    security = None
    if args.curve_secret:
        from broker.shared import CurveClient

        try:
            security = CurveClient.from_files(args.broker_key, args.curve_secret)
        except (OSError, ValueError, RuntimeError) as exc:
            log.error("curve_keys_unreadable", error=str(exc))
            print(f"gridq-worker: {exc}", file=sys.stderr)
            return 2
    worker = Worker(config, REGISTRY, gpu=gpu, security=security)

    def on_signal(signum, _frame) -> None:
        if worker.stopping:
            log.warning("worker_stopping_now", signal=signal.Signals(signum).name, handing_back=worker.running())
            worker.stop(at_once=True)
        else:
            log.warning("worker_draining", signal=signal.Signals(signum).name, running=worker.running(),
                        drain_timeout_s=args.drain_timeout,
                        hint=f"finishing what it runs for up to {args.drain_timeout:g} s; "
                             "Ctrl-C again to stop at once (its tasks are handed back to the broker)")
            worker.stop()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    tune_gc()  # as the broker: a few short-lived containers per task, none of start-up's walked again
    worker.run()
    if worker.refused:
        hint = "" if worker.refused.startswith(WRONG_PORT) else "; choose another --name"
        print(f"gridq-worker: the broker refused this worker: {worker.refused}{hint}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
