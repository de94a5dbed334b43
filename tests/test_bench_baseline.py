"""The benchmark's baseline broker is itself correct: every task comes back exactly once; its sections are found."""

from __future__ import annotations

import struct

from scripts.benchmarks import baseline as bench_baseline, sections
from scripts.benchmarks.baseline import BaselineClient, start_cluster
from scripts.benchmarks.common import BenchConfig


def test_baseline_broker_with_two_workers_answers_every_task_exactly_once():
    cluster = start_cluster(workers=2)
    try:
        with BaselineClient(cluster.frontend, reply_timeout_s=20) as client:
            replies, results = client.run(500, window=64)
        assert sorted(replies) == list(range(500))
        assert set(replies.values()) == {1}
        assert results == [b""] * 500
    finally:
        cluster.close()
    assert cluster.broker.exitcode is not None
    assert all(proc.exitcode is not None for proc in cluster.workers)


def test_baseline_worker_sums_a_payload_array_sent_as_a_frame():
    array = bench_baseline.payload_array(1 << 16)
    cluster = start_cluster(workers=2)
    try:
        with BaselineClient(cluster.frontend, reply_timeout_s=20) as client:
            replies, results = client.run(20, window=4, op=bench_baseline.SUM, payload=(memoryview(array),))
        assert sorted(replies) == list(range(20))
        assert {struct.unpack("<d", r)[0] for r in results} == {float(array.sum())}
    finally:
        cluster.close()


def test_every_benchmark_section_is_found_in_order_and_says_whether_it_can_run_here():
    found = sections.discover()
    assert list(found)[:1] == ["compare"] and "gpu" in found
    cfg = BenchConfig.quick_config()
    for section in found.values():
        reason = section.skip_reason(cfg)
        assert reason is None or isinstance(reason, str) and reason
