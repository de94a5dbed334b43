"""gridq-web's routes: the REST API, the event stream, /metrics, /healthz, the docs and the live page."""

from __future__ import annotations

import json
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Literal, Optional, Union

from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.security import HTTPBearer
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from client.errors import BrokerUnavailable
from client.web.auth import AuthError, bearer
from client.web.events import EventStreamResponse
from client.web.sse import accepts_gzip
from client.web.gateway import ApiError, Config, Gateway, unavailable
from client.web.metrics import CONTENT_TYPE
from client.web.models import (MAX_BATCH, Accepted, BodyError, Cancelled, ErrorOut, Health, Status, TaskIn, TaskList,
                               TaskOut, ThroughputOut, parse_tasks)
from client.web.security import SecurityHeaders

STATIC = Path(__file__).parent / "static"
#: the longest ?wait= honoured; more is taken as this
MAX_WAIT_S = 60.0
#: most tasks one GET /api/tasks page lists
MAX_LIMIT = 1000


def _err(description: str) -> dict:
    return {"model": ErrorOut, "description": description}


QUERY_ERRORS = {422: _err("a query parameter is not valid, or not one the endpoint takes (the message names it)")}
AUTH_ERRORS = {401: _err("no token, or not a valid one (with --tokens)"), **QUERY_ERRORS}
SUBMIT_ERRORS = {**AUTH_ERRORS, 403: _err("a 'read' token cannot submit or cancel")}
BROKER_ERRORS = {503: _err("the broker did not answer in time")}

_bearer = HTTPBearer(auto_error=False, description="a token from the gateway's --tokens file")


def create_app(config: Config) -> FastAPI:
    gateway = Gateway(config)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await gateway.start()
        try:
            yield
        finally:
            await gateway.stop()

    app = FastAPI(title="gridq-web", version="1", lifespan=lifespan, docs_url=None, redoc_url=None,
                  dependencies=[Depends(_known_query)],
                  description="Submit, watch and cancel gridq tasks over HTTP. Errors are "
                              "`{\"error\": {\"type\", \"message\"}}`; the message names the field.")
    app.state.gateway = gateway
    app.add_middleware(SecurityHeaders, https=config.https)
    _handlers(app)

    def role(needs: str):
        def check(request: Request, _creds=Depends(_bearer)) -> None:
            if config.tokens is None:
                return
            token = bearer(request.headers.get("authorization"))
            if token is None and request.url.path == "/api/events":
                token = request.query_params.get("token")  # EventSource cannot send headers
            config.tokens.check(token, needs)
        return Depends(check)

    read, submit = role("read"), role("submit")

    # ------------------------------------------------------------ tasks

    @app.post("/api/tasks", status_code=202, response_model=Union[Accepted, list[Accepted]], dependencies=[submit],
              tags=["tasks"], summary="Submit one task, or an array of up to 10,000",
              responses={**SUBMIT_ERRORS, **BROKER_ERRORS, 409: _err("a key reused for another task"),
                         413: _err("the body is over --max-body"),
                         422: _err("a bad body; the message names the field (and the index, in an array)")},
              openapi_extra={"requestBody": {"required": True, "content": {"application/json": {"schema": {
                  "anyOf": [{"$ref": "#/components/schemas/TaskIn"},
                            {"type": "array", "items": {"$ref": "#/components/schemas/TaskIn"},
                             "minItems": 1, "maxItems": MAX_BATCH}]}}}}})
    async def post_tasks(request: Request):
        body = await _read_json(request, config.max_body_bytes)
        try:
            tasks, batch = parse_tasks(body)
        except BodyError as exc:
            raise ApiError(422, "ValidationError", str(exc)) from None
        ids = await gateway.submit(tasks, batch)
        out = [{"task_id": i, "state": "queued"} for i in ids]
        return JSONResponse(out if batch else out[0], status_code=202)

    @app.get("/api/tasks/{task_id}", response_model=TaskOut, dependencies=[read], tags=["tasks"],
             summary="One task; ?wait= holds the answer until it finishes (at most 60 s)",
             responses={**AUTH_ERRORS, **QUERY_ERRORS, 404: _err("no such task in the gateway's window")})
    async def get_task(task_id: str, wait: float = Query(0.0, ge=0, description="seconds; more than 60 is 60")):
        record = await gateway.window.wait(task_id, min(wait, MAX_WAIT_S))
        if record is None:
            raise ApiError(404, "NotFound", f"task {task_id!r} is not in the gateway's window of recent tasks")
        return JSONResponse(record.full())

    @app.delete("/api/tasks/{task_id}", response_model=Cancelled, dependencies=[submit], tags=["tasks"],
                summary="Cancel a task: true where it will never run",
                responses={**SUBMIT_ERRORS, **BROKER_ERRORS, **QUERY_ERRORS, 404: _err("no such task")})
    async def delete_task(task_id: str, terminate: bool = Query(False, description="kill it where it runs")):
        if gateway.window.get(task_id) is None:
            raise ApiError(404, "NotFound", f"task {task_id!r} is not in the gateway's window of recent tasks")
        return {"cancelled": await gateway.cancel(task_id, terminate)}

    @app.get("/api/tasks", response_model=TaskList, dependencies=[read], tags=["tasks"],
             summary="Recent tasks, most recently submitted first", responses={**AUTH_ERRORS, **QUERY_ERRORS})
    async def list_tasks(state: Optional[Literal["queued", "running", "succeeded", "failed", "cancelled"]] = None,
                         name: Optional[str] = None, limit: int = Query(100, ge=1, le=MAX_LIMIT),
                         cursor: Optional[str] = Query(None, pattern=r"^[0-9]{1,18}$",
                                                       description="'next' of the previous page")):
        tasks, after = gateway.window.list(state=state, name=name, limit=limit,
                                           cursor=None if cursor is None else int(cursor))
        return JSONResponse({"tasks": tasks, "next": None if after is None else str(after)})

    # ------------------------------------------------------------ cluster

    @app.get("/api/status", response_model=Status, dependencies=[read], tags=["cluster"],
             summary="The broker's snapshot (Client.status())", responses={**AUTH_ERRORS, **BROKER_ERRORS})
    async def status():
        return JSONResponse(_jsonable(await gateway.status()))

    @app.get("/api/workers", response_model=list[dict], dependencies=[read], tags=["cluster"],
             summary="Live workers", responses={**AUTH_ERRORS, **BROKER_ERRORS})
    async def workers():
        return JSONResponse(_jsonable((await gateway.status())["workers"]))

    @app.get("/api/events", dependencies=[read], tags=["cluster"], response_class=Response,
             summary="Server-Sent Events: a snapshot, then every event; Last-Event-ID resumes",
             responses={200: {"description": "`id: SEQ`, `event: TOPIC`, `data: JSON`",
                              "content": {"text/event-stream": {"schema": {"type": "string"}}}},
                        **AUTH_ERRORS, **BROKER_ERRORS})
    async def events(request: Request, token: Optional[str] = Query(None, description="the token, for EventSource"),
                     last_event_id: Optional[str] = Query(None, description="as the Last-Event-ID header (which wins)")):
        hub = gateway.hub
        last = _event_id(request.headers.get("last-event-id", last_event_id))
        gzip = accepts_gzip(request.headers.get("accept-encoding"))  # a tenth of the bytes to write
        if last is not None and hub.resumable(last):
            stream, first = hub.resume(last, gzip)
        else:  # new, or an id the gateway no longer holds (or cannot read): a snapshot first
            try:
                stream, first = await hub.fresh(config.broker_wait_s, gzip)
            except BrokerUnavailable as exc:
                raise unavailable(exc) from None
        return EventStreamResponse(hub, stream, first)

    @app.get("/api/throughput", response_model=ThroughputOut, dependencies=[read], tags=["cluster"],
             summary="Tasks submitted, succeeded and failed per second, the last 5 minutes", responses={**AUTH_ERRORS})
    async def throughput():
        return JSONResponse({"seconds": gateway.metrics.throughput.rows()})

    @app.get("/metrics", dependencies=[read], tags=["cluster"], response_class=Response,
             summary="Prometheus metrics", responses={200: {"content": {CONTENT_TYPE: {"schema": {"type": "string"}}}},
                                                      **AUTH_ERRORS})
    async def metrics():
        return Response(gateway.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/healthz", response_model=Health, tags=["cluster"], summary="200 while the broker answers, else 503",
             responses={503: {"model": Health, "description": "the broker does not answer"}, **QUERY_ERRORS})
    async def healthz():
        ok, why = await gateway.healthy()
        return JSONResponse({"ok": ok, "broker": why}, status_code=200 if ok else 503)

    # ------------------------------------------------------------ the page and the docs

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html")

    @app.get("/docs", include_in_schema=False)
    async def docs():
        return FileResponse(STATIC / "docs.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.openapi = lambda: _openapi(app)
    return app


def _openapi(app: FastAPI) -> dict:
    """FastAPI's schema, plus TaskIn (the POST body is read by hand, to cap its size while it streams in)."""
    if app.openapi_schema is None:
        from fastapi.openapi.utils import get_openapi

        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        schema.setdefault("components", {}).setdefault("schemas", {})["TaskIn"] = TaskIn.model_json_schema(
            ref_template="#/components/schemas/{model}")
        app.openapi_schema = schema
    return app.openapi_schema


def _known_query(request: Request) -> None:
    """A query parameter the endpoint does not take is a mistake worth saying, not ignoring."""
    route = request.scope.get("route")
    dependant = getattr(route, "dependant", None)
    if dependant is None or not request.query_params:
        return
    allowed = set(_query_names(dependant))
    extra = sorted(set(request.query_params) - allowed)
    if extra:
        raise ApiError(422, "ValidationError", f"query.{extra[0]}: not a parameter of this endpoint"
                                               f" (it takes: {', '.join(sorted(allowed)) or 'none'})")


def _query_names(dependant):
    yield from (p.alias for p in dependant.query_params)
    for sub in dependant.dependencies:
        yield from _query_names(sub)


async def _read_json(request: Request, limit: int):
    """The request's JSON body, refused with 413 past ``limit`` bytes (declared or streamed) and 422 if not JSON."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, "PayloadTooLarge", f"the body is {int(declared):,} bytes; the limit is {limit:,} (--max-body)")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, "PayloadTooLarge", f"the body is over the limit of {limit:,} bytes (--max-body)")
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(422, "ValidationError", f"body: not valid JSON: {exc}") from None


def _event_id(header: str | None) -> int | None:
    """A Last-Event-ID as a seq; None where there is none or it is not a number."""
    if header is None or not header.strip().isdigit() or len(header.strip()) > 18:
        return None
    return int(header.strip())


def _jsonable(value):
    from client.web.tasks import to_json

    return to_json(value)


def _handlers(app: FastAPI) -> None:
    def error(status: int, type_: str, message: str, headers: dict | None = None) -> JSONResponse:
        return JSONResponse({"error": {"type": type_, "message": message}}, status_code=status, headers=headers)

    @app.exception_handler(ApiError)
    async def api_error(request, exc: ApiError):
        return error(exc.status, exc.type, exc.message)

    @app.exception_handler(AuthError)
    async def auth_error(request, exc: AuthError):
        headers = {"www-authenticate": "Bearer"} if exc.status == 401 else None
        return error(exc.status, "Unauthorized" if exc.status == 401 else "Forbidden", exc.message, headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        path = ".".join(str(p) for p in first.get("loc", ()))
        return error(422, "ValidationError", f"{path}: {first.get('msg')}")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc: StarletteHTTPException):
        return error(exc.status_code, "NotFound" if exc.status_code == 404 else "HTTPError", str(exc.detail),
                     getattr(exc, "headers", None))


__all__ = ["create_app"]
