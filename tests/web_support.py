"""Helpers for the gridq-web tests: start a gateway process, talk HTTP to it, read its event stream."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from tests.conftest import Cluster, wait_until

#: Debian's Chromium (apt-get install chromium); never a browser that playwright downloads
CHROMIUM = "/usr/lib/chromium/chromium"
_SERVING = re.compile(r"gridq-web: serving on (\S+)")


class Web:
    """A running gridq-web process and an HTTP client for it."""

    def __init__(self, proc: subprocess.Popen, url: str, log: Path, token: str | None = None) -> None:
        self.proc, self.url, self.log = proc, url.rstrip("/"), log
        headers = {"authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=20.0, verify=False)

    def get(self, path: str, **kw) -> httpx.Response:
        return self.http.get(path, **kw)

    def post(self, path: str, body=None, **kw) -> httpx.Response:
        return self.http.post(path, json=body, **kw) if body is not None else self.http.post(path, **kw)

    def delete(self, path: str, **kw) -> httpx.Response:
        return self.http.delete(path, **kw)

    def submit(self, task: str, *args, **fields) -> str:
        r = self.post("/api/tasks", {"task": task, "args": list(args), **fields})
        assert r.status_code == 202, r.text
        return r.json()["task_id"]

    def result(self, task_id: str, wait: float = 20.0) -> dict:
        r = self.get(f"/api/tasks/{task_id}", params={"wait": wait})
        assert r.status_code == 200, r.text
        return r.json()

    def metric(self, name: str, labels: str = "") -> float:
        text = self.get("/metrics").text
        key = f"{name}{{{labels}}}" if labels else name
        for line in text.splitlines():
            if line.startswith(key + " "):
                return float(line.split()[-1])
        raise AssertionError(f"{key} not in /metrics:\n{text}")

    def stop(self) -> None:
        self.http.close()
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)


def start_web(cluster: Cluster, *extra: str, token: str | None = None, broker: str | None = None,
              events: str | None = None) -> Web:
    """Start gridq-web on a free loopback port for ``cluster``; returns once it serves."""
    proc = cluster._spawn(["-m", "client.web", "--broker", broker or cluster.frontend, "--events",
                           events or cluster.events, "--listen", "127.0.0.1:0", "--broker-wait", "3",
                           # the test machine is shared: a niced gateway would wait behind every other test run
                           "--nice", "0", *extra], "web")
    log = sorted(cluster.tmp_path.glob("*-web.log"))[-1]

    def serving():
        if proc.poll() is not None:
            raise AssertionError(f"gridq-web exited with {proc.returncode}:\n{log.read_text()}")
        found = _SERVING.search(log.read_text(errors="replace"))
        return found and found.group(1)

    url = wait_until(serving, 30, interval=0.05, what="gridq-web to serve")
    web = Web(proc, url, log, token)
    wait_until(lambda: _answers(web), 30, interval=0.05, what="gridq-web to answer")
    return web


@contextmanager
def web_grid(tmp: Path, broker_args: tuple = (), worker_args: tuple = ("--slots", "2"), web_args: tuple = (),
             token: str | None = None):
    """A broker, one worker named w1 and a gateway (``cluster.web``), all ended on exit."""
    cluster = Cluster(tmp)
    try:
        cluster.start_broker(*broker_args)
        cluster.start_worker(*worker_args, "--name", "w1")
        cluster.wait_workers(1)
        cluster.web = start_web(cluster, *web_args, token=token)
        wait_until(lambda: cluster.web.get("/healthz").status_code == 200, 20, what="gateway healthy")
        yield cluster
    finally:
        if getattr(cluster, "web", None):
            cluster.web.stop()
        cluster.close()


def _answers(web: Web) -> bool:
    try:
        return web.get("/healthz").status_code in (200, 503)
    except httpx.TransportError:
        return False


class SSE:
    """Reads /api/events on a thread; ``events`` is every (id, event, data) received so far."""

    def __init__(self, web: Web, *, last_id: str | None = None, params: dict | None = None,
                 headers: dict | None = None) -> None:
        self.events: list[tuple[str | None, str, object]] = []
        self.status: int | None = None
        self.headers: httpx.Headers | None = None
        self.closed = threading.Event()
        self._lock = threading.Lock()
        hdrs = dict(headers or {})
        if last_id is not None:
            hdrs["last-event-id"] = str(last_id)
        self._client = httpx.Client(base_url=web.url, headers={**web.http.headers, **hdrs}, verify=False,
                                    timeout=httpx.Timeout(20.0, read=30.0))
        self._params = params or {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            with self._client.stream("GET", "/api/events", params=self._params) as r:
                self.headers = r.headers
                self.status = r.status_code
                if r.status_code != 200:
                    return
                fields: dict = {}
                for line in r.iter_lines():
                    if self._stop.is_set():
                        return
                    if line == "":
                        if "event" in fields:
                            with self._lock:
                                self.events.append((fields.get("id"), fields["event"], json.loads(fields.get("data", "null"))))
                        fields = {}
                    elif not line.startswith(":"):
                        name, _, value = line.partition(":")
                        fields[name] = value[1:] if value.startswith(" ") else value
        except (httpx.HTTPError, OSError):
            pass
        finally:
            self.closed.set()

    def of(self, event: str) -> list:
        with self._lock:
            return [e for e in self.events if e[1] == event]

    def snapshot(self) -> list:
        with self._lock:
            return list(self.events)

    def wait(self, predicate, timeout: float = 20.0, what: str = "events"):
        return wait_until(lambda: predicate(self.snapshot()), timeout, interval=0.02, what=what)

    def close(self) -> None:
        self._stop.set()
        self._client.close()
        self._thread.join(timeout=10)


def chromium_or_skip() -> str:
    """Debian's Chromium; under CI=true its absence fails the test instead of skipping it."""
    if os.path.exists(CHROMIUM):
        return CHROMIUM
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"Chromium is missing at {CHROMIUM}: scripts/test installs it when run as root "
                    "(apt-get install chromium)")
    pytest.skip(f"Chromium is not installed at {CHROMIUM} (apt-get install chromium)")


def self_signed(tmp: Path) -> tuple[str, str]:
    """A throwaway certificate for 127.0.0.1 made with openssl."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.fail("openssl is needed to make a test certificate")
    cert, key = tmp / "cert.pem", tmp / "key.pem"
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    return str(cert), str(key)


def run_module(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, env=env)
