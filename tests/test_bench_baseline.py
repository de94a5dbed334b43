"""The benchmark's baseline broker is itself correct: every task comes back exactly once."""

from __future__ import annotations

import struct

from client import bench_baseline
from client.bench_baseline import BaselineClient, start_cluster


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
