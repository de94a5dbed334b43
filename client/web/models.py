"""The gateway's request and response shapes: strict pydantic models, and 422 bodies that name the field."""

from __future__ import annotations

from typing import Annotated, Any, Literal, NamedTuple, Optional

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from broker.protocol import MAX_NAME_LEN, MAX_RESOURCE_QTY

#: most tasks in one POST /api/tasks array
MAX_BATCH = 10_000
#: the broker's bounds (broker/core.py), so a task it would refuse is refused here with a 422 naming the field
PRIORITY_MIN, PRIORITY_MAX = -(2**31), 2**31
MAX_RETRIES = 100
#: the longest timeout a task may ask for, in seconds (a year: beyond it a typo, not a wish)
MAX_TIMEOUT_S = 365 * 24 * 3600.0


ResourceName = Annotated[str, Field(min_length=1, max_length=MAX_NAME_LEN)]
Quantity = Annotated[float, Field(ge=0, le=MAX_RESOURCE_QTY)]
TaskState = Literal["queued", "running", "succeeded", "failed", "cancelled"]


class TaskIn(BaseModel):
    """One task to submit; only ``task`` is required. Types are strict: ``"7"`` is not an integer."""

    model_config = ConfigDict(strict=True, extra="forbid")

    task: str = Field(min_length=1, max_length=MAX_NAME_LEN, description="task name, as a worker serves it")
    args: list[Any] = Field(default_factory=list, description="positional arguments (JSON values)")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="keyword arguments (JSON values)")
    resources: Optional[dict[ResourceName, Quantity]] = Field(
        None, max_length=64, description="resources the task needs, replacing the ones its @task declares")
    priority: int = Field(0, ge=PRIORITY_MIN, le=PRIORITY_MAX, description="higher runs first")
    # constraints inside Optional[...] go in Annotated, or pydantic writes them into the schema unrecognised
    retries: Optional[Annotated[int, Field(ge=0, le=MAX_RETRIES)]] = Field(
        None, description="times it may run again after its worker died")
    timeout: Optional[Annotated[float, Field(gt=0, le=MAX_TIMEOUT_S)]] = Field(None, description="seconds it may run")
    key: Optional[Annotated[str, Field(min_length=1, max_length=MAX_NAME_LEN)]] = Field(None, description="idempotency key")

    @model_validator(mode="before")
    @classmethod
    def _integral(cls, data):
        """JSON has one number type: 7.0 is the integer 7 (as JSON Schema says). "7" and true stay refused."""
        if isinstance(data, dict):
            for name in ("priority", "retries"):
                value = data.get(name)
                if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
                    data = {**data, name: int(value)}
        return data


class Accepted(BaseModel):
    task_id: str
    state: Literal["queued"] = "queued"


class ErrorDetail(BaseModel):
    type: str
    message: str


class ErrorOut(BaseModel):
    error: ErrorDetail


class TaskErrorOut(BaseModel):
    type: str
    message: str
    traceback: str = ""


class TaskOut(BaseModel):
    """A task as the gateway knows it; a finished one adds ``result`` or ``error``, and ``info``."""

    task_id: str
    name: str
    state: TaskState
    submitted_at: Optional[float] = Field(None, description="unix seconds")
    worker: Optional[str] = None
    run_s: Optional[float] = None
    via: Literal["http", "events"] = Field(description="submitted through this gateway, or seen on the event stream")
    result: Any = None
    error: Optional[TaskErrorOut] = None
    info: Optional[dict[str, Any]] = None


class TaskList(BaseModel):
    tasks: list[TaskOut]
    next: Optional[str] = Field(description="cursor for the next page, null on the last one")


class Cancelled(BaseModel):
    cancelled: bool


class ThroughputOut(BaseModel):
    seconds: list[Annotated[list[float], Field(min_length=4, max_length=4)]] = Field(
        description="[unix second, submitted, succeeded, failed], oldest first")


class Health(BaseModel):
    ok: bool
    broker: str = Field(description="'answers', or why not")


class Status(BaseModel):
    """``Client.status()``: the broker's snapshot."""

    model_config = ConfigDict(extra="allow")

    seq: int
    workers: list[dict[str, Any]]
    queued: int
    running: int
    done: int
    failed: int


_task_adapter = TypeAdapter(TaskIn)
_batch_adapter = TypeAdapter(list[TaskIn])


class BodyError(ValueError):
    """A request body that cannot be accepted; ``field`` names where, for the 422 message."""


class TaskSpec(NamedTuple):
    """A task that passed TaskIn's rules: what the gateway submits (TaskIn's fields, read the same way)."""

    task: str
    args: list = []
    kwargs: dict = {}
    resources: Optional[dict] = None
    priority: int = 0
    retries: Optional[int] = None
    timeout: Optional[float] = None
    key: Optional[str] = None


_FIELDS = frozenset(TaskIn.model_fields)


def _plain(item: dict) -> TaskSpec | None:
    """``item`` as a TaskSpec where it plainly meets TaskIn's rules (the usual task: a name, arguments,
    perhaps a priority, retries, a timeout or a key), in a few type checks; None where pydantic must
    judge it (and word the 422). What passes here pydantic would pass too, with the same values."""
    if not item.keys() <= _FIELDS:
        return None
    task, args, kwargs = item.get("task"), item.get("args", []), item.get("kwargs", {})
    if type(task) is not str or not 0 < len(task) <= MAX_NAME_LEN or type(args) is not list or type(kwargs) is not dict:
        return None
    if len(item) == 1 + ("args" in item) + ("kwargs" in item):
        return TaskSpec(task, args, kwargs)  # nothing else: the common case
    priority, retries, timeout, key = (item.get("priority", 0), item.get("retries"), item.get("timeout"),
                                       item.get("key"))
    if (item.get("resources") is not None or type(priority) is not int or not PRIORITY_MIN <= priority <= PRIORITY_MAX
            or retries is not None and (type(retries) is not int or not 0 <= retries <= MAX_RETRIES)
            or timeout is not None and (type(timeout) is not float or not 0 < timeout <= MAX_TIMEOUT_S)
            or key is not None and (type(key) is not str or not 0 < len(key) <= MAX_NAME_LEN)):
        return None
    return TaskSpec(task, args, kwargs, None, priority, retries, timeout, key)


def parse_tasks(body: Any) -> tuple[list, bool]:
    """Validate a POST /api/tasks body: one object or an array of them. Returns (tasks, was_array):
    TaskSpecs, where every task plainly meets the rules (one cheap pass), else TaskIns (pydantic)."""
    if isinstance(body, list):
        if not body:
            raise BodyError("body: an array of tasks must hold at least one task")
        if len(body) > MAX_BATCH:
            raise BodyError(f"body: an array holds at most {MAX_BATCH} tasks, got {len(body)}")
        plain = []
        for index, item in enumerate(body):
            if not isinstance(item, dict):
                raise BodyError(f"body[{index}]: must be a JSON object with at least \"task\", got {type(item).__name__}")
            spec = _plain(item)
            if spec is None:
                break
            plain.append(spec)
        else:
            return plain, True
        try:  # one call for the whole array: its errors carry the index first in their location
            return _batch_adapter.validate_python(body), True
        except ValidationError as exc:
            raise BodyError(describe(exc, "body")) from None
    spec = _plain(body) if isinstance(body, dict) else None
    return [spec or _validate(body, "")], False


def _validate(item: Any, where: str) -> TaskIn:
    if not isinstance(item, dict):
        raise BodyError(f"body{where}: must be a JSON object with at least \"task\", got {type(item).__name__}")
    try:
        return _task_adapter.validate_python(item)
    except ValidationError as exc:
        raise BodyError(describe(exc, f"body{where}")) from None


def describe(exc: ValidationError, prefix: str) -> str:
    """The first problem of a pydantic error as one line naming the field: ``body[3].priority: ...``."""
    err = exc.errors(include_url=False)[0]
    path = prefix + "".join(f"[{p!r}]" if isinstance(p, int) or not p else f".{p}" for p in err["loc"])
    more = len(exc.errors()) - 1
    return f"{path}: {err['msg']}" + (f" (and {more} more problem{'s' * (more > 1)})" if more else "")


__all__ = ["TaskIn", "TaskSpec", "Accepted", "ErrorOut", "TaskOut", "TaskList", "Cancelled", "Health", "Status", "BodyError",
           "parse_tasks", "describe", "MAX_BATCH", "MAX_RESOURCE_QTY"]
