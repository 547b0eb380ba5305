"""Who may talk to the broker, and as whom: keys, the allow-list, credentials.

The local default (an ``ipc://`` socket in a private directory, or loopback)
needs no keys: only the user who owns the socket can reach it, so every peer
has one credential, that user's (:data:`LOCAL_CREDENTIAL`). Over a network the
broker speaks CURVE: it holds a secret key, admits only clients whose public
key is in its allow-list directory (checked by a ZAP handler, re-read when the
directory changes), and a peer's credential is its public key.

A session is bound to the credential that opened it: requests naming its
``sid`` under any other credential are refused. The bindings are stored with
the broker's state, so they outlive restarts.

Clients pin the broker's public key: ``FLEETBUS_SERVER_KEY`` names the
broker's public key file and ``FLEETBUS_CLIENT_KEY`` the client's secret key
file; both are read when a ``tcp://`` connection is opened.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Hashable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from fleetbus.errors import BadInput, NotAuthorised

LOCAL_CREDENTIAL = f"user:{os.getuid()}"
"""The credential of every peer on the local default: the owning user."""

SERVER_KEY_ENV = "FLEETBUS_SERVER_KEY"
CLIENT_KEY_ENV = "FLEETBUS_CLIENT_KEY"
CURVE_PREFIX = "curve:"
ZAP_DOMAIN = "fleetbus"

_OWNERS_SCHEMA = """
CREATE TABLE IF NOT EXISTS session_owners (
    sid TEXT PRIMARY KEY,
    credential TEXT NOT NULL
);
"""


# -- keys -------------------------------------------------------------------------


def create_keys(directory: Path, name: str) -> tuple[Path, Path]:
    """Create a key pair ``NAME.key`` (public) and ``NAME.key_secret``.

    The directory is created private to the user, the secret file readable by
    the user only. Refuses to overwrite an existing pair.
    """
    if not name or "/" in name or name.startswith("."):
        raise BadInput(f"a key name must be a plain file name, not {name!r}")
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    public = directory / f"{name}.key"
    secret = directory / f"{name}.key_secret"
    if public.exists() or secret.exists():
        raise BadInput(f"a key named {name!r} already exists in {directory}")
    old_umask = os.umask(0o077)
    try:
        made_public, made_secret = zmq.auth.create_certificates(directory, name)
    finally:
        os.umask(old_umask)
    os.chmod(made_secret, 0o600)
    os.chmod(made_public, 0o644)
    return Path(made_public), Path(made_secret)


def load_public(path: Path) -> bytes:
    """The public key (Z85) in a key file, public or secret."""
    try:
        public, _secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise BadInput(f"cannot read key file {path}: {exc}") from exc
    return bytes(public)


def load_secret(path: Path) -> tuple[bytes, bytes]:
    """The public and secret keys (Z85) in a secret key file."""
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise BadInput(f"cannot read key file {path}: {exc}") from exc
    if not secret:
        raise BadInput(f"{path} holds no secret key (use the .key_secret file)")
    return bytes(public), bytes(secret)


def allowed_keys(directory: Path) -> set[str]:
    """The public keys (Z85 text) of every ``*.key`` file in ``directory``."""
    if not directory.is_dir():
        raise BadInput(f"key directory {directory} does not exist")
    return {load_public(path).decode() for path in sorted(directory.glob("*.key"))}


# -- the client side ------------------------------------------------------------------


def apply_client_curve(sock: zmq.Socket[Any], url: str) -> None:
    """Make ``sock`` a CURVE client when ``FLEETBUS_SERVER_KEY`` is set.

    Only for ``tcp://``: local sockets rely on file permissions.
    """
    server = os.environ.get(SERVER_KEY_ENV)
    if not server or not url.startswith("tcp://"):
        return
    client = os.environ.get(CLIENT_KEY_ENV)
    if not client:
        raise BadInput(
            f"{SERVER_KEY_ENV} is set but {CLIENT_KEY_ENV} is not: "
            "name this client's secret key file"
        )
    public, secret = load_secret(Path(client))
    sock.curve_serverkey = load_public(Path(server))
    sock.curve_publickey = public
    sock.curve_secretkey = secret


# -- the broker side ---------------------------------------------------------------


@dataclass(slots=True)
class CurveSettings:
    """The broker's CURVE settings: its secret key and the key directories."""

    secret: Path
    allow: Path
    operators: Path | None = None


@dataclass(slots=True)
class _Bucket:
    tokens: float
    at: float


@dataclass(slots=True)
class RateLimiter:
    """A token bucket per peer: ``rate`` requests a second, bursts of ``burst``.

    A peer is any hashable key: the broker uses a connection's identity, or
    the identity and a session id for a session's requests.
    """

    rate: float
    burst: float
    buckets: dict[Hashable, _Bucket] = field(default_factory=dict)

    def admit(self, peer: Hashable, now: float) -> bool:
        """Take one token of ``peer``'s bucket; False when it is empty."""
        if self.rate <= 0:
            return True
        bucket = self.buckets.get(peer)
        if bucket is None:
            bucket = self.buckets[peer] = _Bucket(self.burst, now)
        bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.at) * self.rate)
        bucket.at = now
        if bucket.tokens < 1:
            return False
        bucket.tokens -= 1
        return True

    def prune(self, now: float) -> None:
        """Forget buckets that have refilled: their peers are idle."""
        refill = self.burst / self.rate if self.rate > 0 else 0.0
        idle = [p for p, b in self.buckets.items() if now - b.at >= refill]
        for peer in idle:
            del self.buckets[peer]


class BrokerSecurity:
    """Credentials, session owners, operators and CURVE for one broker."""

    def __init__(
        self,
        curve: CurveSettings | None = None,
        *,
        local_operator: bool = True,
        cross_repo: bool = False,
    ) -> None:
        self.curve = curve
        self.local_operator = local_operator
        self.cross_repo = cross_repo
        self.owners: dict[str, str] = {}
        self.operators: set[str] = set()
        self._auth: ThreadAuthenticator | None = None
        self._allow_mtime = 0.0
        self._db: sqlite3.Connection | None = None

    @property
    def uses_curve(self) -> bool:
        """Whether peers authenticate with CURVE keys."""
        return self.curve is not None

    def secure(self, ctx: zmq.Context[Any], sockets: list[zmq.Socket[Any]]) -> None:
        """Make ``sockets`` CURVE servers and start the ZAP handler."""
        if self.curve is None:
            return
        public, secret = load_secret(self.curve.secret)
        self._auth = ThreadAuthenticator(ctx)
        self._auth.start()
        self.reload(force=True)
        for sock in sockets:
            sock.curve_server = True
            sock.curve_publickey = public
            sock.curve_secretkey = secret
            sock.zap_domain = ZAP_DOMAIN.encode()

    def reload(self, *, force: bool = False) -> bool:
        """Re-read the allow-list and operator keys if their directories changed.

        Returns whether they were read again. A directory that cannot be read
        keeps the keys already loaded.
        """
        if self.curve is None or self._auth is None:
            return False
        try:
            mtime = _mtime(self.curve.allow, self.curve.operators)
            if not force and mtime == self._allow_mtime:
                return False
            operators = set()
            if self.curve.operators is not None:
                operators = allowed_keys(self.curve.operators)
            allowed_keys(self.curve.allow)
        except (OSError, BadInput):
            return False
        self._allow_mtime = mtime
        self.operators = {CURVE_PREFIX + key for key in operators}
        self._auth.configure_curve(domain=ZAP_DOMAIN, location=str(self.curve.allow))
        return True

    def close(self) -> None:
        """Stop the ZAP handler."""
        if self._auth is not None:
            self._auth.stop()
            self._auth = None

    def credential(self, frame: zmq.Frame) -> str:
        """The credential of the peer that sent ``frame``."""
        if self.curve is None:
            return LOCAL_CREDENTIAL
        user = frame.get("User-Id")
        return CURVE_PREFIX + str(user)

    def is_operator(self, credential: str) -> bool:
        """Whether ``credential`` may force-release claims and unbind sessions."""
        if credential == LOCAL_CREDENTIAL:
            return self.local_operator
        return credential in self.operators

    # -- session owners ----------------------------------------------------------

    def load_owners(self, db: sqlite3.Connection) -> None:
        """Read the stored session owners (and create their table)."""
        self._db = db
        db.executescript(_OWNERS_SCHEMA)
        self.owners = dict(db.execute("SELECT sid, credential FROM session_owners"))

    def bind(self, sid: str, credential: str) -> None:
        """Bind ``sid`` to ``credential``; the caller's transaction stores it.

        On the local default every peer is the same user, so nothing needs
        binding and nothing is stored.
        """
        if self.curve is None or self.owners.get(sid) == credential:
            return
        self.check(sid, credential)
        self.owners[sid] = credential
        if self._db is not None:
            self._db.execute(
                "INSERT OR REPLACE INTO session_owners VALUES (?, ?)",
                (sid, credential),
            )

    def unbind(self, sid: str) -> None:
        """Forget who opened ``sid``; the caller's transaction stores it."""
        self.owners.pop(sid, None)
        if self._db is not None:
            self._db.execute("DELETE FROM session_owners WHERE sid = ?", (sid,))

    def check(self, sid: str, credential: str) -> None:
        """Refuse ``credential`` acting as ``sid`` when another one opened it."""
        owner = self.owners.get(sid)
        if owner is not None and owner != credential:
            raise NotAuthorised(
                f"session {sid!r} was opened with another credential (an "
                f"operator can free the id: fleetbus unbind {sid})",
                sid=sid,
            )

    def may_read_all(self, credential: str) -> bool:
        """Whether ``credential`` may read every repository.

        The local user, operators, and anyone on a broker configured for it
        may; any other key reads only where it holds a session.
        """
        return (
            self.cross_repo
            or credential == LOCAL_CREDENTIAL
            or self.is_operator(credential)
        )


def _mtime(*paths: Path | None) -> float:
    newest = 0.0
    for path in paths:
        if path is None:
            continue
        newest = max(newest, path.stat().st_mtime)
        for entry in path.glob("*.key"):
            newest = max(newest, entry.stat().st_mtime)
    return newest


# -- commands -----------------------------------------------------------------------


def default_keys_dir() -> Path:
    """Where ``fleetbus keys`` writes unless told: the user's config directory."""
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "fleetbus" / "keys"


def run_keys(directory: Path | None, names: list[str]) -> int:
    """``fleetbus keys``: create a key pair per name and say how to use them."""
    target = directory or default_keys_dir()
    for name in names:
        public, secret = create_keys(target, name)
        print(f"{name}: public {public}, secret {secret}")
    print(
        "Broker: --curve-secret BROKER.key_secret --curve-allow DIR (copy each "
        "client's .key there).\nClient: "
        f"{SERVER_KEY_ENV}=BROKER.key {CLIENT_KEY_ENV}=CLIENT.key_secret"
    )
    return 0
