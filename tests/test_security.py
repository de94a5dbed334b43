"""CURVE end to end: keys from gridq-keygen, one allowlist per role, reload on change and on SIGHUP."""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import zmq
import zmq.auth
from structlog.testing import capture_logs

from broker.__main__ import parse_args as broker_args
from broker.security import CurveServer, KeyDir, is_loopback
from broker.shared import CurveClient
from broker.server import Broker, BrokerConfig
from client import BrokerUnavailable
from tests.conftest import wait_until
from worker.__main__ import parse_args as worker_args

pytestmark = pytest.mark.skipif(not zmq.has("curve"), reason="libzmq without CURVE")


def keygen(directory: Path, name: str, *extra: str) -> subprocess.CompletedProcess:
    """Run gridq-keygen as a user would: the installed script, else the module behind it."""
    script = Path(sys.executable).with_name("gridq-keygen")
    cmd = [str(script)] if script.exists() else [sys.executable, "-c",
                                                  "import sys; from broker.security import keygen_main; sys.exit(keygen_main())"]
    return subprocess.run([*cmd, str(directory), name, *extra], capture_output=True, text=True, timeout=60)


@pytest.fixture
def keys(tmp_path):
    """Key pairs for a broker, a client (alice), a worker (w1) and a stranger (mallory),
    with alice's public key allowed as a client and w1's as a worker."""
    home = tmp_path / "keys"
    for name in ("broker", "alice", "w1", "mallory"):
        assert keygen(home, name).returncode == 0
    clients, workers = tmp_path / "client-keys", tmp_path / "worker-keys"
    clients.mkdir()
    workers.mkdir()
    shutil.copy(home / "alice.key", clients)
    shutil.copy(home / "w1.key", workers)
    return SimpleNamespace(home=home, clients=clients, workers=workers,
                           broker=str(home / "broker.key"), secret=lambda n: str(home / f"{n}.key_secret"))


def start_curve_broker(cluster, keys):
    return cluster.start_broker("--curve-secret", keys.secret("broker"), "--client-keys", str(keys.clients),
                                "--worker-keys", str(keys.workers))


def start_curve_worker(cluster, keys, name: str, key: str):
    return cluster.start_worker("--name", name, "--broker-key", keys.broker, "--curve-secret", keys.secret(key))


def curve_client(cluster, keys, key: str = "alice", **kwargs):
    return cluster.client(broker_key=keys.broker, secret=keys.secret(key), **kwargs)


def wait_curve_workers(cluster, keys, names: set, timeout: float = 20.0) -> dict:
    with curve_client(cluster, keys) as c:
        return wait_until(lambda: (s := c.status()) and names <= {w["name"] for w in s["workers"]} and s,
                          timeout, interval=0.05, what=f"workers {sorted(names)}")


def broker_log(cluster) -> str:
    return next(cluster.tmp_path.glob("*-broker.log")).read_text(errors="replace")


def refused(cluster, role: str, key_file: str) -> bool:
    public = zmq.auth.load_certificate(key_file)[0].decode()
    return any("curve_key_refused" in line and f"role={role}" in line and public in line
               for line in broker_log(cluster).splitlines())


def assert_unavailable(cluster, **kwargs) -> None:
    with cluster.client(timeout=0.3, retries=1, **kwargs) as c:
        with pytest.raises(BrokerUnavailable):
            c.status()


# ------------------------------------------------------------------ keygen


def test_keygen_writes_a_pair_that_zmq_auth_reads_with_a_private_secret(tmp_path):
    result = keygen(tmp_path / "new", "node-1")
    assert result.returncode == 0, result.stderr
    public, none = zmq.auth.load_certificate(tmp_path / "new" / "node-1.key")
    public2, secret = zmq.auth.load_certificate(tmp_path / "new" / "node-1.key_secret")
    assert none is None and public == public2 and len(public) == 40 and len(secret) == 40
    assert stat.S_IMODE(os.stat(tmp_path / "new" / "node-1.key_secret").st_mode) == 0o600


def test_keygen_refuses_to_overwrite_a_pair_or_take_a_path_as_name(tmp_path):
    assert keygen(tmp_path, "a").returncode == 0
    before = (tmp_path / "a.key").read_bytes()
    again = keygen(tmp_path, "a")
    assert again.returncode != 0 and "--force" in again.stderr
    assert (tmp_path / "a.key").read_bytes() == before
    assert keygen(tmp_path, "a", "--force").returncode == 0
    assert (tmp_path / "a.key").read_bytes() != before
    assert keygen(tmp_path, "../escape").returncode != 0
    assert not (tmp_path.parent / "escape.key").exists()


def test_keys_made_by_zmq_auth_itself_work_as_keys(tmp_path):
    public_file, secret_file = zmq.auth.create_certificates(tmp_path, "other-tool")
    client = CurveClient.from_files(public_file, secret_file)
    assert client.public == zmq.auth.load_certificate(public_file)[0]


def test_curve_client_needs_both_files_and_a_secret_one(keys):
    with pytest.raises(ValueError, match="both"):
        CurveClient.from_files(keys.broker, None)
    with pytest.raises(ValueError, match="no secret key"):
        CurveClient.from_files(keys.broker, keys.home / "alice.key")
    with pytest.raises(OSError):
        CurveClient.from_files(keys.home / "nope.key", keys.secret("alice"))


# ------------------------------------------------------------------ flags


def test_broker_refuses_half_configured_curve_flags(capsys):
    with pytest.raises(SystemExit):
        broker_args(["--curve-secret", "b.key_secret", "--client-keys", "dir"])
    assert "--worker-keys" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        worker_args(["--broker-key", "b.key"])


def test_broker_refuses_to_start_with_a_missing_key_dir(cluster, keys):
    proc = cluster.start_broker("--curve-secret", keys.secret("broker"), "--client-keys", str(keys.clients),
                                "--worker-keys", str(keys.home / "missing"))
    assert proc.wait(timeout=30) == 2
    assert "broker_start_failed" in broker_log(cluster)


# ------------------------------------------------------------------ allowlists (no sockets)


def test_key_dir_rereads_when_a_key_file_is_added_or_removed(keys):
    allowed = KeyDir("client", keys.clients)
    alice = zmq.auth.load_certificate(keys.home / "alice.key")[0]
    mallory = zmq.auth.load_certificate(keys.home / "mallory.key")[0]
    assert allowed.callback("client", alice) and not allowed.callback("client", mallory)
    shutil.copy(keys.home / "mallory.key", keys.clients)
    assert allowed.callback("client", mallory)
    (keys.clients / "alice.key").unlink()
    assert not allowed.callback("client", alice)


def test_key_dir_ignores_secrets_and_unreadable_files_and_survives_its_directory_vanishing(keys):
    shutil.copy(keys.home / "mallory.key_secret", keys.clients)
    (keys.clients / "broken.key").write_text("not a certificate\n")
    allowed = KeyDir("client", keys.clients)
    assert allowed.names() == ["alice"]
    shutil.rmtree(keys.clients)
    alice = zmq.auth.load_certificate(keys.home / "alice.key")[0]
    assert allowed.callback("client", alice) is False


# ------------------------------------------------------------------ exposure


def test_loopback_endpoints_are_told_apart_from_network_ones():
    for endpoint in ("tcp://127.0.0.1:5555", "tcp://localhost:1", "tcp://[::1]:5555", "tcp://127.0.0.2:*",
                     "ipc:///tmp/gridq", "inproc://x"):
        assert is_loopback(endpoint), endpoint
    for endpoint in ("tcp://*:5555", "tcp://0.0.0.0:5555", "tcp://10.0.0.5:5555", "tcp://eth0:5555",
                     "tcp://[::]:5555", "tcp://example.org:5555", "garbage"):
        assert not is_loopback(endpoint), endpoint


def test_broker_without_curve_says_loopback_only_or_warns_when_exposed():
    def logged(security, **endpoints):
        fake = SimpleNamespace(security=security, config=BrokerConfig(**endpoints))
        with capture_logs() as logs:
            Broker._log_exposure(fake)
        return [(e["log_level"], e["event"]) for e in logs]

    assert logged(None) == [("info", "broker_loopback_only")]
    assert logged(None, frontend="tcp://*:5555") == [("warning", "broker_exposed_without_curve")]
    assert logged(object(), frontend="tcp://*:5555") == []


def test_broker_start_log_says_it_runs_without_curve_on_loopback(cluster):
    cluster.start_broker()
    cluster.wait_workers(0)
    wait_until(lambda: "broker_loopback_only" in broker_log(cluster), 10, what="start log")
    assert "curve=False" in broker_log(cluster)


# ------------------------------------------------------------------ end to end


def test_allowed_client_and_worker_work_over_curve_end_to_end(cluster, keys, events):
    start_curve_broker(cluster, keys)
    start_curve_worker(cluster, keys, "w1", "w1")
    snapshot = wait_curve_workers(cluster, keys, {"w1"})
    assert [w["name"] for w in snapshot["workers"]] == ["w1"]
    with curve_client(cluster, keys) as c:
        assert c.map("square", range(20)) == [i * i for i in range(20)]
        assert c.submit("echo", {"x": [1, 2]}).result(timeout=20) == {"x": [1, 2]}


def test_events_reach_an_allowed_subscriber_over_curve(cluster, keys):
    start_curve_broker(cluster, keys)
    wait_curve_workers(cluster, keys, set())
    ctx = zmq.Context.instance()
    sub = ctx.socket(zmq.SUB)
    sub.linger = 0
    try:
        CurveClient.from_files(keys.broker, keys.secret("alice")).apply_client(sub)
        sub.setsockopt(zmq.SUBSCRIBE, b"broker.stats")
        sub.connect(cluster.events)
        assert sub.poll(20_000), "no broker.stats over CURVE"
        assert sub.recv_multipart()[0] == b"broker.stats"
    finally:
        sub.close(linger=0)


def test_unknown_client_key_gets_nothing(cluster, keys):
    start_curve_broker(cluster, keys)
    wait_curve_workers(cluster, keys, set())  # the broker serves allowed clients
    assert_unavailable(cluster, broker_key=keys.broker, secret=keys.secret("mallory"))
    assert refused(cluster, "client", keys.home / "mallory.key")


def test_plain_client_gets_nothing_from_a_curve_broker(cluster, keys):
    start_curve_broker(cluster, keys)
    wait_curve_workers(cluster, keys, set())
    assert_unavailable(cluster)


def test_a_worker_key_cannot_submit_or_read(cluster, keys):
    start_curve_broker(cluster, keys)
    wait_curve_workers(cluster, keys, set())
    assert_unavailable(cluster, broker_key=keys.broker, secret=keys.secret("w1"))
    assert refused(cluster, "client", keys.home / "w1.key")


def test_a_worker_using_a_client_key_never_joins(cluster, keys):
    start_curve_broker(cluster, keys)
    start_curve_worker(cluster, keys, "impostor", "alice")
    wait_until(lambda: refused(cluster, "worker", keys.home / "alice.key"), 20, what="the impostor's refusal")
    start_curve_worker(cluster, keys, "w1", "w1")
    snapshot = wait_curve_workers(cluster, keys, {"w1"})
    assert [w["name"] for w in snapshot["workers"]] == ["w1"]
    assert "impostor" not in broker_log(cluster)


def test_a_plain_worker_never_joins_a_curve_broker(cluster, keys):
    start_curve_broker(cluster, keys)
    plain = cluster.start_worker("--name", "plain")
    wait_until(lambda: "worker_announced" in next(cluster.tmp_path.glob("*-worker.log")).read_text(), 20,
               what="the plain worker to try")
    start_curve_worker(cluster, keys, "w1", "w1")
    snapshot = wait_curve_workers(cluster, keys, {"w1"})
    assert plain.poll() is None and [w["name"] for w in snapshot["workers"]] == ["w1"]


def test_a_client_key_added_then_sighup_lets_the_client_in(cluster, keys):
    broker = start_curve_broker(cluster, keys)
    wait_curve_workers(cluster, keys, set())
    assert_unavailable(cluster, broker_key=keys.broker, secret=keys.secret("mallory"))
    shutil.copy(keys.home / "mallory.key", keys.clients)
    os.kill(broker.pid, signal.SIGHUP)
    wait_until(lambda: broker_log(cluster).count("curve_keys_loaded") >= 4, 10, what="reload after SIGHUP")
    with curve_client(cluster, keys, "mallory") as c:
        assert c.status()["workers"] == []


def test_a_removed_worker_key_keeps_new_connections_out_without_a_signal(cluster, keys):
    start_curve_broker(cluster, keys)
    wait_curve_workers(cluster, keys, set())
    (keys.workers / "w1.key").unlink()
    start_curve_worker(cluster, keys, "w1", "w1")
    wait_until(lambda: refused(cluster, "worker", keys.home / "w1.key"), 20, what="w1 refused after removal")
    with curve_client(cluster, keys) as c:
        assert c.status()["workers"] == []


def test_curve_server_rejects_an_unknown_role(keys):
    server = CurveServer.from_files(keys.secret("broker"), keys.clients, keys.workers)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    try:
        with pytest.raises(ValueError, match="role"):
            server.apply_server(sock, "admin")
    finally:
        sock.close(linger=0)
        server.stop()
        ctx.term()
