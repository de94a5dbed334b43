"""CURVE for the broker's sockets, the per-role key allowlists, and gridq-keygen.

Policy lives here; zmq.auth's ThreadAuthenticator only runs it. One ZAP handler
sees every socket of a context, so each broker socket carries its role as its
ZAP domain (``client`` for frontend and events, ``worker`` for the backend) and
each domain has its own allowlist: a client key cannot serve as a worker and a
worker key cannot submit or subscribe.

Key files are those of ``zmq.auth.create_certificates``: ``NAME.key`` holds a
public key, ``NAME.key_secret`` a pair. An allowlist is a directory of ``*.key``
files, re-read whenever its listing changes and on ``reload()`` (SIGHUP).
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import re
import sys
import threading
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from broker.logs import get_logger
from broker.shared import CurveClient, load_pair  # noqa: F401 (CurveClient: its old home, still imported there)

log = get_logger(__name__)

#: ZAP domain of each role; a socket's role picks the allowlist its peers must be in
ROLES = ("client", "worker")
#: suffix of a public key file in an allowlist directory (secret files end in _secret)
PUBLIC_SUFFIX = ".key"
#: a key pair name: one path component, nothing a shell or a glob would misread
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class KeyDir:
    """The public keys allowed for one role: the ``*.key`` files of a directory.

    ``callback`` is zmq.auth's credentials-provider hook; it runs on the
    authenticator thread at each handshake and first re-reads the directory if
    any file in it was added, removed or rewritten (a stat per file, no reads).
    """

    def __init__(self, role: str, path: str | os.PathLike) -> None:
        self.role = role
        self.path = Path(path)
        if not self.path.is_dir():
            raise ValueError(f"--{role}-keys {self.path}: not a directory")
        self._lock = threading.RLock()  # RLock: a SIGHUP may land while this thread reloads
        self._signature: tuple | None = None
        self._keys: dict[bytes, str] = {}  #: z85 public key -> key file name
        self.reload(force=True)

    def __len__(self) -> int:
        return len(self._keys)

    def names(self) -> list[str]:
        return sorted(self._keys.values())

    def _scan(self) -> tuple:
        entries = []
        with os.scandir(self.path) as it:
            for entry in it:
                if entry.name.endswith(PUBLIC_SUFFIX) and entry.is_file():
                    st = entry.stat()
                    entries.append((entry.name, st.st_mtime_ns, st.st_size, st.st_ino))
        return tuple(sorted(entries))

    def reload(self, force: bool = False) -> bool:
        """Re-read the directory if it changed (or always, with ``force``). True if re-read."""
        with self._lock:
            try:
                signature = self._scan()
            except OSError as exc:
                # the directory vanished or became unreadable: allow nobody rather than a stale set
                if self._keys or self._signature is None:
                    log.error("curve_keys_unreadable", role=self.role, dir=str(self.path), error=str(exc))
                self._keys, self._signature = {}, None
                return True
            if not force and signature == self._signature:
                return False
            keys = {}
            for name, *_ in signature:
                try:
                    public, _secret = zmq.auth.load_certificate(self.path / name)
                except (OSError, ValueError) as exc:
                    log.warning("curve_key_unreadable", role=self.role, file=str(self.path / name), error=str(exc))
                    continue
                keys[public] = name[: -len(PUBLIC_SUFFIX)]
            self._keys, self._signature = keys, signature
            log.info("curve_keys_loaded", role=self.role, dir=str(self.path), keys=sorted(keys.values()))
            return True

    def allows(self, z85_key: bytes) -> str | None:
        """The name of an allowed key, or None."""
        return self._keys.get(z85_key)

    def callback(self, domain: str, z85_key: bytes) -> bool:
        """zmq.auth credentials provider: may this key connect in this role?"""
        try:  # an exception here would stop the authenticator thread: every handshake would stall
            self.reload()
            name = self.allows(z85_key)
        except Exception as exc:
            log.error("curve_check_failed", role=self.role, error=f"{type(exc).__name__}: {exc}")
            return False
        if name is None:
            log.warning("curve_key_refused", role=self.role, key=z85_key.decode("ascii", "replace"))
            return False
        log.debug("curve_key_accepted", role=self.role, key_name=name)
        return True


class CurveServer:
    """The broker's key pair and allowlists; ``apply_server`` makes a socket a CURVE server.

    The authenticator thread starts on the first socket, in that socket's context
    (ZAP is per context), and must be running before any peer connects.
    """

    def __init__(self, public: bytes, secret: bytes, client_keys: KeyDir, worker_keys: KeyDir) -> None:
        if not zmq.has("curve"):
            raise RuntimeError("this libzmq was built without CURVE support")
        self.public = public
        self.secret = secret
        self.allowlists = {"client": client_keys, "worker": worker_keys}
        self._auth: ThreadAuthenticator | None = None

    @classmethod
    def from_files(cls, secret_file: str | os.PathLike, client_keys: str | os.PathLike,
                   worker_keys: str | os.PathLike) -> "CurveServer":
        public, secret = load_pair(secret_file, "--curve-secret")
        return cls(public, secret, KeyDir("client", client_keys), KeyDir("worker", worker_keys))

    def start(self, context: zmq.Context) -> None:
        if self._auth is not None:
            if self._auth.context is not context:
                raise RuntimeError("CurveServer serves one zmq context; its sockets must share it")
            return
        auth = ThreadAuthenticator(context)
        for role, keys in self.allowlists.items():
            auth.configure_curve_callback(domain=role, credentials_provider=keys)
        auth.start()
        self._auth = auth

    def apply_server(self, sock: zmq.Socket, role: str) -> None:
        """Make ``sock`` (not yet bound) a CURVE server admitting only ``role``'s keys."""
        if role not in self.allowlists:
            raise ValueError(f"unknown role {role!r}: expected one of {ROLES}")
        self.start(sock.context)
        sock.zap_domain = role.encode()
        sock.curve_secretkey = self.secret
        sock.curve_publickey = self.public
        sock.curve_server = True

    def reload(self) -> None:
        """Re-read both allowlists now (SIGHUP). Open connections keep their handshake."""
        for keys in self.allowlists.values():
            keys.reload(force=True)

    def stop(self) -> None:
        if self._auth is not None:
            self._auth.stop()
            self._auth = None


# ------------------------------------------------------------------ exposure


def is_loopback(endpoint: str) -> bool:
    """Whether only this machine can reach ``endpoint`` (tcp on a loopback address, ipc, inproc)."""
    transport, sep, rest = endpoint.partition("://")
    if not sep:
        return False
    if transport in ("ipc", "inproc"):
        return True
    if transport not in ("tcp", "ws", "wss"):
        return False
    host = rest.split(";")[-1]  # "tcp://src;dst" names the bound address last
    host = host.split("/", 1)[0]
    host = host.rsplit(":", 1)[0] if ":" in host else host
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # "*", an interface name or a host name


# ------------------------------------------------------------------ keygen


def keygen_main(argv=None) -> int:
    """gridq-keygen DIR NAME: write DIR/NAME.key (public) and DIR/NAME.key_secret (secret)."""
    p = argparse.ArgumentParser(prog="gridq-keygen", description="Write a CURVE key pair for gridq.")
    p.add_argument("dir", metavar="DIR", help="directory for the key files (created if missing)")
    p.add_argument("name", metavar="NAME", help="key name: writes DIR/NAME.key and DIR/NAME.key_secret")
    p.add_argument("--force", action="store_true", help="overwrite an existing pair")
    args = p.parse_args(argv)
    if not _NAME_RE.match(args.name) or args.name.endswith((PUBLIC_SUFFIX, "_secret")):
        p.error(f"NAME {args.name!r}: letters, digits, '.', '_' and '-' only, without a .key suffix")
    if not zmq.has("curve"):
        print("gridq-keygen: this libzmq was built without CURVE support", file=sys.stderr)
        return 2
    directory = Path(args.dir)
    public_file = directory / f"{args.name}{PUBLIC_SUFFIX}"
    secret_file = directory / f"{args.name}{PUBLIC_SUFFIX}_secret"
    if not args.force and (public_file.exists() or secret_file.exists()):
        print(f"gridq-keygen: {public_file} or {secret_file} exists; pass --force to overwrite", file=sys.stderr)
        return 1
    try:
        directory.mkdir(parents=True, exist_ok=True)
        old_umask = os.umask(0o077)  # the secret file is never readable by others, not even briefly
        try:
            zmq.auth.create_certificates(directory, args.name)
        finally:
            os.umask(old_umask)
        os.chmod(public_file, 0o644)
        os.chmod(secret_file, 0o600)
    except OSError as exc:
        print(f"gridq-keygen: {exc}", file=sys.stderr)
        return 1
    public, _ = zmq.auth.load_certificate(public_file)
    print(f"public key  {public_file}  ({public.decode()})")
    print(f"secret key  {secret_file}  (keep it on this machine)")
    return 0


if __name__ == "__main__":
    sys.exit(keygen_main())
