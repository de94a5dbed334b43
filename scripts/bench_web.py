"""Benchmark gridq-web (issue 12's figures): batch POST latency, gateway submit rate against Client.map,
broker throughput with 50 SSE streams open against none, gateway RSS, and the page's first paint and
JS heap. Starts its own broker, workers and gateway on free loopback ports and stops them by PID.

    .venv/bin/python scripts/bench_web.py            # about 2 minutes
    .venv/bin/python scripts/bench_web.py --quick    # about 40 s, smaller counts
    .venv/bin/python scripts/bench_web.py --only streams --stream-encoding identity   # one figure
    .venv/bin/python scripts/bench_web.py --only streams --rounds 1 --stream-seconds 90   # the gateway's RSS over time
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import mean

import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from client import Client  # noqa: E402

CHROMIUM = "/usr/lib/chromium/chromium"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise TimeoutError(f"timed out after {timeout_s} s waiting for {what}")


class Procs:
    """Every process the benchmark starts; all ended by PID on exit."""

    def __init__(self, tmp: Path) -> None:
        self.tmp, self.procs = tmp, []
        self.env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}

    def start(self, name: str, *args: str) -> subprocess.Popen:
        log = open(self.tmp / f"{name}.log", "wb")
        proc = subprocess.Popen([sys.executable, *args], stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=self.tmp)
        log.close()
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen) -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)

    def close(self) -> None:
        for proc in reversed(self.procs):
            self.stop(proc)


def start_web(procs: Procs, frontend: str, events: str, name: str = "web") -> tuple[subprocess.Popen, str]:
    proc = procs.start(name, "-m", "client.web", "--broker", frontend, "--events", events, "--listen", "127.0.0.1:0")
    log = procs.tmp / f"{name}.log"

    def url():
        if proc.poll() is not None:
            raise RuntimeError(log.read_text())
        for line in log.read_text(errors="replace").splitlines():
            if line.startswith("gridq-web: serving on "):
                return line.split()[-1].rstrip("/")
        return None

    base = wait_for(url, 30, "gridq-web")
    wait_for(lambda: httpx.get(base + "/healthz").status_code == 200, 30, "gateway healthy")
    return proc, base


def map_rate(frontend: str, n: int) -> float:
    with Client(frontend) as c:
        c.map("noop", range(200))  # warm
        started = time.perf_counter()
        c.map("noop", range(n))
        return n / (time.perf_counter() - started)


def map_rates(frontend: str, n: int, seconds: float, pids: dict, after_each=None) -> tuple[list, dict]:
    """``map_rate(n)`` again and again for ``seconds``: each map's rate, and the CPU microseconds each
    process in ``pids`` spent per task meanwhile. The same maps with and without the gateway: a
    rate is compared only with rates of maps of the same size."""
    rates, before = [], cpu_s(pids)
    end = time.monotonic() + seconds
    while not rates or time.monotonic() < end:
        rates.append(map_rate(frontend, n))
        if after_each is not None:
            after_each()
    return rates, per_task(before, cpu_s(pids), len(rates) * (n + 200))


def done_count(frontend: str) -> int:
    with Client(frontend) as c:
        return c.status()["done"]


def gateway_rate(base: str, frontend: str, n: int, web: subprocess.Popen, batch: int = 10_000) -> dict:
    """POST n no-ops in arrays of ``batch``; accepted rate, and end-to-end until all are done; each
    POST's time, and the gateway's CPU seconds over the run."""
    before = done_count(frontend)
    cpu_before = gateway_cpu_s(web)
    each = []
    with httpx.Client(base_url=base, timeout=60) as http:
        body = json.dumps([{"task": "noop"}] * batch).encode()
        headers = {"content-type": "application/json"}
        started = time.perf_counter()
        first_batch_s = None
        for i in range(n // batch):
            t0 = time.perf_counter()
            r = http.post("/api/tasks", content=body, headers=headers)
            r.raise_for_status()
            each.append(round(time.perf_counter() - t0, 3))
            if first_batch_s is None:
                first_batch_s = each[0]
        accepted_s = time.perf_counter() - started
    with Client(frontend) as c:
        wait_for(lambda: c.status()["done"] - before >= n, 300, "gateway tasks done")
    total_s = time.perf_counter() - started
    return {"first_batch_accepted_s": first_batch_s, "batches_accepted_s": each, "accepted_per_s": n / accepted_s,
            "done_per_s": n / total_s, "gateway_cpu_s_per_10k": round((gateway_cpu_s(web) - cpu_before) * 10_000 / n, 2)}


async def _read_streams(base: str, count: int, out: str, encoding: str = "gzip", max_s: float = 600.0) -> None:
    """``count`` SSE readers that keep up; every second, bytes read and streams ended go to ``out``.
    They ask for ``encoding`` as browsers do (an EventSource's request takes gzip), and read it
    without decoding (a browser decodes on its own machine). Runs until killed (or ``max_s``)."""
    totals = {"bytes": 0, "ended": 0, "connected": 0}

    host, port = base.split("//")[1].split(":")

    async def reader():
        # a raw socket that reads and discards, as cheap as a reader can be: browsers run elsewhere
        try:
            r, w = await asyncio.open_connection(host, int(port))
            w.write(f"GET /api/events HTTP/1.1\r\nHost: {host}\r\nAccept: text/event-stream\r\n"
                    f"Accept-Encoding: {encoding}\r\n\r\n".encode())
            await w.drain()
            totals["connected"] += 1
            while chunk := await r.read(1 << 20):
                totals["bytes"] += len(chunk)
        except OSError:
            pass
        totals["ended"] += 1

    tasks = [asyncio.ensure_future(reader()) for _ in range(count)]
    end = time.monotonic() + max_s
    while time.monotonic() < end:
        await asyncio.sleep(1.0)
        Path(out).write_text(json.dumps(totals))
    for t in tasks:
        t.cancel()


def streams_process(base: str, count: int, out: Path, encoding: str = "gzip") -> list:
    """The readers stand for browsers on other machines: niced, so that on this one they take only
    the CPU that the broker, workers and client leave (they keep up: ``streams`` says what they read)."""
    code = (f"import asyncio, os, sys; os.nice(19); sys.path.insert(0, {str(ROOT / 'scripts')!r}); "
            f"import bench_web as b; asyncio.run(b._read_streams({base!r}, {count}, {str(out)!r}, {encoding!r}))")
    return [sys.executable, "-c", code]


def metric(base: str, name: str) -> float:
    for line in httpx.get(base + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


def streams_open(base: str) -> float:
    return metric(base, "gridq_web_event_streams")


def gateway_cpu_s(proc: subprocess.Popen) -> float:
    return sum(psutil.Process(proc.pid).cpu_times()[:2])


def cpu_s(pids: dict) -> dict:
    """CPU seconds (user + system) of each named process and its children, by name."""
    out = {}
    for name, pid in pids.items():
        try:
            proc = psutil.Process(pid)
            family = [proc] if pid == os.getpid() else [proc, *proc.children(recursive=True)]  # the client: itself
            out[name] = sum(sum(p.cpu_times()[:2]) for p in family)
        except psutil.Error:
            out[name] = 0.0
    return out


def status_seq(frontend: str) -> int:
    with Client(frontend) as c:
        return c.status()["seq"]


def rss_mib(proc: subprocess.Popen) -> float:
    return psutil.Process(proc.pid).memory_info().rss / (1 << 20)


def page_figures(base: str, frontend: str, seconds: float) -> dict:
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--enable-precise-memory-info"])
        page = browser.new_page(viewport={"width": 1440, "height": 1000})
        started = time.perf_counter()
        page.goto(base + "/")
        expect(page.locator("[data-testid=connection]")).to_have_text("live", timeout=30_000)
        live_s = time.perf_counter() - started
        paint = page.evaluate("(performance.getEntriesByName('first-contentful-paint')[0] || {}).startTime || null")
        heap = lambda: page.evaluate("performance.memory.usedJSHeapSize") / (1 << 20)  # noqa: E731
        cdp = page.context.new_cdp_session(page)

        def retained() -> float:
            """The heap after a full collection: what the page keeps, without the collector's sawtooth."""
            cdp.send("HeapProfiler.collectGarbage")
            return round(heap(), 1)

        heap_start, retained_start = heap(), retained()
        samples = []
        with Client(frontend) as c:
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                c.map("noop", range(5000))  # a busy cluster: the page takes every event
                samples.append(round(heap(), 1))
            retained_end = retained()
            still_live = page.locator("[data-testid=connection]").inner_text() == "live"
        browser.close()
    return {"first_contentful_paint_ms": paint, "live_s": live_s, "js_heap_mib_start": round(heap_start, 1),
            "js_heap_mib_samples": samples[:: max(1, len(samples) // 10)], "js_heap_mib_end": samples[-1] if samples else None,
            "js_heap_mib_min_max": [min(samples), max(samples)] if samples else None,
            "js_heap_mib_after_gc": [retained_start, retained_end], "live_at_end": still_live}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller counts (about 40 s)")
    ap.add_argument("--page-seconds", type=float, default=None, help="how long the page watches a busy cluster")
    ap.add_argument("--stream-seconds", type=float, default=None,
                    help="how long the 50 streams read while the cluster runs no-ops (gateway RSS sampled throughout)")
    ap.add_argument("--rounds", type=int, default=3,
                    help="streams phases, each followed by a phase with no gateway (the streams' time is split "
                         "among them; 1 with a long --stream-seconds for the gateway's RSS over time)")
    ap.add_argument("--stream-encoding", choices=("gzip", "identity"), default="gzip",
                    help="what the 50 readers ask for (gzip: as a browser's EventSource does)")
    ap.add_argument("--only", choices=("post", "streams", "page"), action="append",
                    help="run only these figures (repeatable; the no-gateway rate is always measured)")
    args = ap.parse_args()
    only = set(args.only or ("post", "streams", "page"))
    n_map = 20_000 if args.quick else 50_000
    n_web = 20_000 if args.quick else 50_000
    stream_s = args.stream_seconds or (10.0 if args.quick else 20.0)
    page_s = args.page_seconds if args.page_seconds is not None else (15.0 if args.quick else 60.0)
    results: dict = {"cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory(prefix="gridq-bench-web-") as tmp:
        procs = Procs(Path(tmp))
        try:
            frontend, backend, events = (f"tcp://127.0.0.1:{free_port()}" for _ in range(3))
            pids = {"client": os.getpid(), "broker": procs.start("broker", "-m", "broker", "--frontend", frontend, "--backend", backend,
                                          "--events", events).pid}
            for i in range(2):
                pids[f"worker{i}"] = procs.start(f"worker{i}", "-m", "worker", "--broker", backend, "--slots", "2",
                                                 "--name", f"bench-{i}").pid
            with Client(frontend) as c:
                wait_for(lambda: len(c.status()["workers"]) == 2, 30, "workers")

            # 1. broker throughput with no gateway, and what each process spends per task meanwhile
            # (measured again after each round of streams, the gateway stopped: see alternated())
            rounds = max(args.rounds, 1)
            no_gateway, results["cpu_us_per_task_no_gateway"] = map_rates(frontend, n_map // 4, stream_s / rounds, pids)
            results["map_per_s_no_gateway"] = mean(no_gateway)
            # 2. the gateway: batch POST and submit rate, same run
            web, base = start_web(procs, frontend, events)
            results["gateway_rss_mib_start"] = round(rss_mib(web), 1)
            if "post" in only:
                results["map_per_s_gateway_idle"] = map_rate(frontend, n_map)
                results.update(gateway_rate(base, frontend, n_web, web))
            # 3. 50 SSE streams reading while the cluster runs no-ops flat out
            if "streams" in only:
                results.update(alternated(procs, pids, (web, base), (frontend, events), n_map, stream_s / rounds, rounds,
                                          args.stream_encoding, no_gateway))
                if "page" in only:
                    web, base = start_web(procs, frontend, events, "web2")
            # 4. the page
            if "page" in only and os.path.exists(CHROMIUM):
                results["page"] = page_figures(base, frontend, page_s)
                results["gateway_rss_mib_end"] = round(rss_mib(web), 1)
        finally:
            procs.close()
    print(json.dumps(results, indent=2))
    report(results, stream_s)
    return 0


def alternated(procs: Procs, pids: dict, gateway: tuple, addresses: tuple, n_map: int, phase_s: float, rounds: int,
               encoding: str, before: list) -> dict:
    """``rounds`` times: 50 streams read for ``phase_s`` (a fresh gateway from the second round on),
    then the gateway is stopped and the same maps run ``phase_s`` with none. Each round's rate is
    compared with the no-gateway phases on either side of it (``before``: the first one): a cluster's
    rate drifts, and single maps move by 10 %, so one no-gateway sample is no baseline. The last
    round's CPU, RSS and reads are reported in full; whether the gateway kept up, for every round."""
    (web, base), (frontend, events) = gateway, addresses
    no_gateway, with_streams, ratios, kept_up, gateway_us = [mean(before)], [], [], [], []
    for r in range(rounds):
        if r:
            web, base = start_web(procs, frontend, events, f"web-round{r}")
        results = streams_figures(procs, pids, web, base, frontend, n_map, phase_s, encoding)
        procs.stop(web)
        after, results["cpu_us_per_task_no_gateway_after"] = map_rates(frontend, n_map // 4, phase_s, pids)
        no_gateway.append(mean(after))
        with_streams.append(results["map_per_s_50_streams"])
        ratios.append(round(with_streams[-1] / mean(no_gateway[-2:]), 3))
        kept_up.append(results["gateway_resyncs_and_streams_dropped"] == [0, 0])
        gateway_us.append(results["cpu_us_per_task_50_streams"]["gateway"])
    results.update({
        "rounds": rounds, "map_per_s_50_streams_rounds": [round(x) for x in with_streams],
        "map_per_s_no_gateway_phases": [round(x) for x in no_gateway], "ratio_rounds": ratios,
        "gateway_cpu_us_per_task_rounds": gateway_us, "kept_up_rounds": kept_up,
        "map_per_s_50_streams": mean(with_streams), "map_per_s_no_gateway": mean(no_gateway)})
    results["ratio_50_streams_vs_no_gateway"] = results["map_per_s_50_streams"] / results["map_per_s_no_gateway"]
    return results


def per_task(before: dict, after: dict, tasks: int) -> dict:
    return {name: round((after[name] - before[name]) * 1e6 / tasks, 1) for name in before}


def streams_figures(procs: Procs, pids: dict, web, base: str, frontend: str, n_map: int, stream_s: float,
                    encoding: str) -> dict:
    """The broker's rate while 50 SSE streams read, the CPU each process spends per task meanwhile,
    and the gateway's RSS throughout."""
    results: dict = {"stream_encoding": encoding}
    out = procs.tmp / "streams.json"
    readers = subprocess.Popen(streams_process(base, 50, out, encoding), env=procs.env)
    try:
        wait_for(lambda: streams_open(base) >= 50, 120, "50 streams")
        rss_before = rss_mib(web)
        everyone = {**pids, "gateway": web.pid, "readers": readers.pid}
        # a gateway that falls behind skips work (its SUB socket drops events; it takes a snapshot):
        # its figures then flatter it, so whether it kept up is reported with them
        fell_behind = [metric(base, "gridq_web_snapshots_total"), metric(base, "gridq_web_event_streams_dropped_total")]
        cpu_before, seq_before = gateway_cpu_s(web), status_seq(frontend)
        rss_samples: list = []
        began = time.monotonic()
        rates, results["cpu_us_per_task_50_streams"] = map_rates(
            frontend, n_map // 4, stream_s, everyone,
            lambda: rss_samples.append((round(time.monotonic() - began), round(rss_mib(web), 1))))
        results["map_per_s_50_streams"] = mean(rates)
        # the gateway's CPU per event the broker published meanwhile: less noisy than a rate on a shared box
        results["gateway_cpu_us_per_event_50_streams"] = round(
            (gateway_cpu_s(web) - cpu_before) * 1e6 / max(status_seq(frontend) - seq_before, 1), 1)
        results["gateway_rss_mib_50_streams"] = [round(rss_before, 1), round(rss_mib(web), 1)]
        results["gateway_rss_mib_samples"] = rss_samples[:: max(1, len(rss_samples) // 20)]
        later = [rss for t, rss in rss_samples if t >= stream_s / 3]  # after a third: warm
        results["gateway_rss_growth_after_warm_mib"] = round(max(later) - later[0], 1) if later else None
        results["streams_open_at_end"] = streams_open(base)
        results["gateway_resyncs_and_streams_dropped"] = [
            metric(base, "gridq_web_snapshots_total") - fell_behind[0],
            metric(base, "gridq_web_event_streams_dropped_total") - fell_behind[1]]
        time.sleep(1.5)
        results["streams"] = json.loads(out.read_text())
    finally:
        if readers.poll() is None:
            readers.send_signal(signal.SIGTERM)
        readers.wait(timeout=30)
    return results


def report(r: dict, stream_s: float) -> None:
    print(f"\nload average at the end: {os.getloadavg()[0]:.1f}")
    print(f"CPU us per task, no gateway: {r['cpu_us_per_task_no_gateway']}")
    if "first_batch_accepted_s" in r:
        _report_post(r)
    if "map_per_s_50_streams" in r:
        _report_streams(r, stream_s)
    if "page" in r:
        print(f"page: first paint {r['page']['first_contentful_paint_ms']:.0f} ms, live in {r['page']['live_s']:.2f} s, "
              f"JS heap {r['page']['js_heap_mib_start']} -> {r['page']['js_heap_mib_end']} MiB "
              f"(samples {r['page']['js_heap_mib_min_max']}; after a full collection "
              f"{r['page']['js_heap_mib_after_gc'][0]} -> {r['page']['js_heap_mib_after_gc'][1]} MiB); "
              f"live at the end: {r['page']['live_at_end']}")


def _report_post(r: dict) -> None:
    print(f"10,000-task batch POST accepted in {r['first_batch_accepted_s']:.2f} s (the first), "
          f"{sorted(r['batches_accepted_s'])[len(r['batches_accepted_s']) // 2]:.2f} s (median of "
          f"{len(r['batches_accepted_s'])}); gateway CPU {r['gateway_cpu_s_per_10k']:.2f} s per 10,000 tasks")
    print(f"gateway: {r['accepted_per_s']:,.0f} tasks/s accepted, {r['done_per_s']:,.0f} tasks/s done; "
          f"Client.map {r['map_per_s_gateway_idle']:,.0f} tasks/s (ratio {r['done_per_s'] / r['map_per_s_gateway_idle']:.2f})")


def _report_streams(r: dict, stream_s: float) -> None:
    print(f"broker with 50 SSE streams ({r['stream_encoding']}): {r['map_per_s_50_streams']:,.0f} tasks/s vs {r['map_per_s_no_gateway']:,.0f} "
          f"with no gateway ({r['ratio_50_streams_vs_no_gateway']:.2f}x; the same maps, {r['rounds']} round(s) "
          f"{r['map_per_s_50_streams_rounds']} between no-gateway phases {r['map_per_s_no_gateway_phases']}: "
          f"{r['ratio_rounds']}); the gateway's CPU meanwhile (last round): "
          f"{r['gateway_cpu_us_per_event_50_streams']} us per event; the streams read {r['streams']['bytes'] / 1e6:,.0f} MB")
    print(f"CPU us per task with 50 streams (last round): {r['cpu_us_per_task_50_streams']}; gateway per round "
          f"{r['gateway_cpu_us_per_task_rounds']}; the gateway kept up: "
          f"{'yes' if all(r['kept_up_rounds']) else 'NO'} in every round "
          f"(last round: snapshots taken, streams dropped meanwhile: {r['gateway_resyncs_and_streams_dropped']})")
    print(f"gateway RSS while the 50 streams read {stream_s:.0f} s: {r['gateway_rss_mib_50_streams'][0]} -> "
          f"{r['gateway_rss_mib_50_streams'][1]} MiB; growth after the first third: "
          f"{r['gateway_rss_growth_after_warm_mib']} MiB; samples (s, MiB): {r['gateway_rss_mib_samples']}")


if __name__ == "__main__":
    sys.exit(main())
