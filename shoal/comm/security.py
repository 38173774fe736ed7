"""Authenticated, encrypted control links: CURVE keys per engine start, sender identity.

Every ZeroMQ link that crosses hosts (tcp://) uses CurveZMQ. The driver makes a
fresh server key pair and one client key pair per rank each time it starts;
its sockets are CURVE servers, and a ZAP handler (:class:`ControlAuthenticator`)
admits only the ranks' public keys, tagging every frame it lets through with
the rank as ``User-Id``. So a peer without a rank's secret key can neither
connect (to read plans) nor inject frames, and a frame's claimed rank is checked
against the key that sent it (:func:`sender_problem`).

How keys reach workers:

- mp workers are local and talk over ipc:// in a 0700 directory: no keys needed;
- Ray actors get their rank's :class:`WorkerKeys` as an argument of their
  ``run`` call (through Ray's object store, never a file);
- external (headless) workers read a key file the driver writes with mode 0600:
  ``$SHOAL_CONTROL_KEY_FILE``, else ``$SHOAL_CACHE_DIR/control/driver-<port>.json``
  (default ``~/.cache/shoal``), which is shared wherever home directories are
  (Slurm clusters) or copied by the launcher. A file that exists when the
  driver starts is used as it is, so keys may also be made ahead of time
  (:func:`write_key_file`).
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq
from zmq.auth.thread import ThreadAuthenticator

logger = logging.getLogger(__name__)

KEY_FILE_ENV = "SHOAL_CONTROL_KEY_FILE"


@dataclass(frozen=True)
class WorkerKeys:
    """What one rank needs to join a CURVE-protected driver (z85 text, 40 chars each)."""

    rank: int
    server_public: str
    public: str
    secret: str

    def to_dict(self) -> dict[str, Any]:
        return {"rank": self.rank, "server_public": self.server_public,
                "public": self.public, "secret": self.secret}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> WorkerKeys:
        return cls(int(data["rank"]), str(data["server_public"]), str(data["public"]),
                   str(data["secret"]))

    def apply(self, sock: zmq.Socket) -> None:
        """Make ``sock`` (before connect) a CURVE client of the driver."""
        sock.curve_serverkey = self.server_public.encode()
        sock.curve_publickey = self.public.encode()
        sock.curve_secretkey = self.secret.encode()


@dataclass(frozen=True)
class ControlKeys:
    """The driver's keys for one engine start: its pair and one client pair per rank."""

    server_public: str
    server_secret: str
    clients: dict[int, tuple[str, str]]  # rank -> (public, secret)

    @classmethod
    def generate(cls, world_size: int) -> ControlKeys:
        public, secret = zmq.curve_keypair()
        clients = {}
        for rank in range(world_size):
            cpub, csec = zmq.curve_keypair()
            clients[rank] = (cpub.decode(), csec.decode())
        return cls(public.decode(), secret.decode(), clients)

    def for_rank(self, rank: int) -> WorkerKeys:
        public, secret = self.clients[rank]
        return WorkerKeys(rank, self.server_public, public, secret)

    def rank_of(self, client_public_z85: str) -> int | None:
        for rank, (public, _) in self.clients.items():
            if public == client_public_z85:
                return rank
        return None

    def apply_server(self, sock: zmq.Socket) -> None:
        """Make ``sock`` (before bind) a CURVE server that the authenticator guards."""
        sock.curve_server = True
        sock.curve_publickey = self.server_public.encode()
        sock.curve_secretkey = self.server_secret.encode()
        sock.zap_domain = b"shoal"

    def to_json(self) -> str:
        return json.dumps({
            "server_public": self.server_public,
            "server_secret": self.server_secret,
            "clients": {str(r): list(pair) for r, pair in self.clients.items()},
        })

    @classmethod
    def from_json(cls, text: str) -> ControlKeys:
        try:
            data = json.loads(text)
            clients = {int(r): (str(p), str(s)) for r, (p, s) in data["clients"].items()}
            keys = cls(str(data["server_public"]), str(data["server_secret"]), clients)
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"not a shoal control key file: {exc}") from None
        for key in (keys.server_public, keys.server_secret,
                    *(k for pair in keys.clients.values() for k in pair)):
            if len(key) != 40:
                raise ValueError("not a shoal control key file: keys must be 40 z85 characters")
        return keys


def key_file_path(bootstrap_port: int) -> Path:
    """Where a driver at ``bootstrap_port`` keeps its keys (``$SHOAL_CONTROL_KEY_FILE`` wins)."""
    override = os.environ.get(KEY_FILE_ENV)
    if override:
        return Path(override)
    cache = os.environ.get("SHOAL_CACHE_DIR") or os.path.join(os.path.expanduser("~"),
                                                              ".cache", "shoal")
    return Path(cache) / "control" / f"driver-{bootstrap_port}.json"


def write_key_file(path: Path, keys: ControlKeys) -> None:
    """Write ``keys`` to ``path`` readable by this user only (0600), atomically."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".keys-")  # mkstemp makes it 0600
    try:
        with os.fdopen(fd, "w") as f:
            f.write(keys.to_json())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def read_key_file(path: Path) -> ControlKeys:
    """Read a key file; refuse one that other users may read."""
    try:
        mode = path.stat().st_mode
        text = path.read_text()
    except OSError as exc:
        raise ValueError(
            f"cannot read the driver's control key file {path} ({exc.strerror}): the driver "
            f"writes it when it starts; share it with the workers or set {KEY_FILE_ENV}"
        ) from None
    if mode & 0o077:
        raise ValueError(f"control key file {path} is readable by other users "
                         f"(mode {mode & 0o777:o}); chmod 600 it")
    return ControlKeys.from_json(text)


def worker_keys_from_file(rank: int, bootstrap_port: int, wait_s: float = 10.0) -> WorkerKeys:
    """A headless worker's keys, from the driver's key file (waits ``wait_s`` for it)."""
    path = key_file_path(bootstrap_port)
    deadline = time.monotonic() + wait_s
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.2)  # a shared file system may show the driver's file late
    keys = read_key_file(path)
    if rank not in keys.clients:
        raise ValueError(
            f"the driver has no key for rank {rank} (its key file {path} covers ranks "
            f"0..{max(keys.clients)}): does the launcher's WORLD_SIZE match the driver's "
            "tp x pp x dp?")
    return keys.for_rank(rank)


class ControlAuthenticator:
    """ZAP handler of a driver's context: admit only the ranks' keys; User-Id = the rank."""

    def __init__(self, ctx: zmq.Context, keys: ControlKeys):
        self.keys = keys
        self._auth = _RankAuthenticator(ctx, keys)
        self._auth.start()
        self._auth.configure_curve_callback("shoal", credentials_provider=self)

    def callback(self, domain: str, key: bytes | str) -> bool:
        client = key.decode() if isinstance(key, bytes) else key
        if self.keys.rank_of(client) is None:
            logger.warning("refused a control connection with an unknown CURVE key")
            return False
        return True

    def stop(self) -> None:
        self._auth.stop()


class _RankAuthenticator(ThreadAuthenticator):
    def __init__(self, ctx: zmq.Context, keys: ControlKeys):
        super().__init__(ctx, log=logging.getLogger(__name__ + ".zap"))
        self._keys = keys

    def curve_user_id(self, client_public_key: bytes) -> str:
        rank = self._keys.rank_of(zmq.utils.z85.encode(client_public_key).decode())
        return str(rank)


def peer_rank(frame: Any) -> int | None:
    """The rank the CURVE handshake proved for a received frame, or None (no CURVE)."""
    try:
        user = frame.get("User-Id")
    except (AttributeError, zmq.ZMQError):
        return None
    try:
        return int(user)
    except (TypeError, ValueError):
        return None


def claimed_rank(msg: Any) -> int | None:
    """The rank a worker's message says it comes from (``rank``, or a heartbeat's ``sender``)."""
    for name in ("rank", "sender"):
        value = getattr(msg, name, None)
        if value is not None:
            return value
    return None


def sender_problem(msg: Any, proven: int | None, world_size: int,
                   allowed: tuple[type, ...], output_ranks: frozenset[int]) -> str | None:
    """Why a message on the driver's return socket must be dropped, or None when it may pass.

    Args:
        msg: the decoded message.
        proven: the rank its CURVE key proves (None on ipc, where only this user can connect).
        world_size: ranks are 0..world_size-1.
        allowed: the message types workers send.
        output_ranks: the ranks that send step results (messages without a rank field).
    """
    if not isinstance(msg, allowed):
        return f"{type(msg).__name__} is not a message workers send"
    claimed = claimed_rank(msg)
    if claimed is None:  # a step result: only an output rank sends one
        if proven is not None and proven not in output_ranks:
            return f"{type(msg).__name__} from rank {proven}, which is not an output rank"
        return None
    if type(claimed) is not int or not 0 <= claimed < world_size:
        return f"{type(msg).__name__} claims rank {claimed!r}; world size is {world_size}"
    if proven is not None and claimed != proven:
        return f"{type(msg).__name__} claims rank {claimed} but was sent with rank {proven}'s key"
    return None
