"""Reach the sidecar of an agent session from a short-lived process.

A hook runs as a fresh process on every tool call of an agent, and the
``fleetbus`` CLI runs as one when an agent calls it from its shell. Neither
should pay for joining the fleet, so each agent session has a *sidecar*
(:mod:`fleetbus.agents.sidecar`) that holds the session, and these processes
talk to it over a unix socket in the private runtime directory: one JSON line
in, one JSON line out.

A hook whose session's sidecar already runs takes a shorter way still
(:func:`hook`): it hands the sidecar the agent's event as it came, framed
without JSON, and writes back the answer the sidecar rendered, so that the
hook process imports nothing beyond this module, ``_socket`` and ``_sha256``.

This module imports only the standard library (and fleetbus modules that do
the same), because it sits on the path of every hook.

Files of one sidecar, all named by a hash of the agent's session id
(``sc-<key>``) in :func:`fleetbus.paths.runtime_dir`:

- ``.sock``: the socket it answers on;
- ``.start``: the lock that starting processes take, so that one starts it;
- ``.lock``: the lock the sidecar holds for its lifetime, with its pid;
- ``.log``: its output.
"""

# Every import here costs each hook run, so this module keeps to modules the
# interpreter has loaded at start-up (``os``, ``sys``, ``time``) and to
# ``_socket`` and ``_sha256``, what ``socket`` and ``hashlib`` wrap without
# their enum tables and OpenSSL load. ``json``, fleetbus.errors (and with it
# ``typing``) and ``subprocess`` are imported only on the paths that need them;
# for the same reason there is no ``from __future__ import annotations``
# (it imports ``__future__``), and annotations naming typing-only types are
# strings.
import _socket
import os
import sys
import time

try:
    from _sha256 import sha256  # type: ignore[import-not-found,unused-ignore]
except ImportError:  # Python 3.12 renamed it _sha2.
    try:
        from _sha2 import sha256  # type: ignore
    except ImportError:
        from hashlib import sha256  # type: ignore[assignment,unused-ignore]

TYPE_CHECKING = False
if TYPE_CHECKING:
    import subprocess
    from collections.abc import Iterator, Mapping
    from typing import Any

AGENT_PID_ENV = "FLEETBUS_AGENT_PID"
# Where a process finds the agent session it runs in: an explicit choice
# first, then what the agents export to the commands they run.
SESSION_ENVS = ("FLEETBUS_SESSION", "CLAUDE_CODE_SESSION_ID", "GEMINI_SESSION_ID")
# Enough for a cold sidecar: interpreter, pyzmq and one broker round trip.
START_TIMEOUT_S = 10.0
CALL_TIMEOUT_S = 8.0
# The sidecar's exit status when another one holds the session's lock.
EXIT_BUSY = 75
_POLL_S = 0.01
_MAX_REPLY = 8 * 1024 * 1024
_SHELLS = frozenset({"sh", "bash", "dash", "zsh", "fish", "ksh", "ash", "busybox"})
_AGENT_WORDS = ("claude", "codex", "gemini")


def unavailable(message: str) -> Exception:
    """A :class:`~fleetbus.errors.BrokerUnavailable` saying no sidecar answers."""
    from fleetbus.errors import BrokerUnavailable

    return BrokerUnavailable(message)


def runtime_dir() -> str:
    """:func:`fleetbus.paths.runtime_dir`, without importing ``pathlib``."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    path = os.path.join(base, "fleetbus") if base else f"/tmp/fleetbus-{os.getuid()}"
    os.makedirs(path, mode=0o700, exist_ok=True)
    os.chmod(path, 0o700)
    return path


def session_key(session_id: str) -> str:
    """The short hash that names a session's sidecar files."""
    digest: str = sha256(session_id.encode()).hexdigest()
    return digest[:20]


def sidecar_file(session_id: str, suffix: str) -> str:
    """The sidecar file of ``session_id`` with ``suffix`` (``.sock``, ``.log``…)."""
    return os.path.join(runtime_dir(), f"sc-{session_key(session_id)}{suffix}")


def session_from_env(env: dict[str, str] | None = None) -> str | None:
    """The agent session id the environment names, if any."""
    source = os.environ if env is None else env
    for name in SESSION_ENVS:
        value = source.get(name)
        if value:
            return value
    return None


def call_sidecar(
    session_id: str, request: "dict[str, Any]", *, timeout: float = CALL_TIMEOUT_S
) -> "dict[str, Any]":
    """Send ``request`` to the sidecar of ``session_id`` and return its reply.

    Raises :class:`~fleetbus.errors.BrokerUnavailable` when no sidecar listens
    or it does not answer within ``timeout`` seconds, and the matching
    :class:`~fleetbus.errors.FleetbusError` when it answers with an error (a
    refused claim, an unreachable broker).
    """
    import json

    path = sidecar_file(session_id, ".sock")
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(path)
        sock.sendall(json.dumps(request).encode() + b"\n")
        raw = _read_line(sock)
    except TimeoutError as exc:
        message = f"the session sidecar did not answer within {timeout:g}s"
        raise unavailable(message) from exc
    except OSError as exc:
        raise unavailable(f"no session sidecar at {path}: {exc}") from exc
    finally:
        sock.close()
    try:
        reply = json.loads(raw)
    except ValueError:
        reply = None
    if not isinstance(reply, dict):
        raise unavailable("the session sidecar sent a malformed reply")
    if not reply.get("ok"):
        from fleetbus.errors import error_from_wire

        raise error_from_wire(reply.get("error") or {})
    return reply


def _read_line(sock: _socket.socket) -> bytes:
    chunks: list[bytes] = []
    for chunk in _received(sock):
        end = chunk.find(b"\n")
        if end >= 0:
            chunks.append(chunk[:end])
            return b"".join(chunks)
        chunks.append(chunk)
    raise ConnectionResetError("the sidecar closed the connection")


def _received(sock: _socket.socket) -> "Iterator[bytes]":
    """The chunks the sidecar sends until it closes the connection.

    Raises ``ConnectionResetError`` once more than ``_MAX_REPLY`` bytes came and
    the reader asks for more.
    """
    size = 0
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return
        yield chunk
        size += len(chunk)
        if size > _MAX_REPLY:
            raise ConnectionResetError("the sidecar's reply is too large")


def answers(session_id: str) -> bool:
    """Whether a sidecar of ``session_id`` accepts connections now."""
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        sock.connect(sidecar_file(session_id, ".sock"))
    except OSError:
        return False
    finally:
        sock.close()
    return True


def ensure_sidecar(
    session_id: str,
    *,
    agent: str,
    cwd: str,
    agent_pid: int | None = None,
    timeout: float = START_TIMEOUT_S,
) -> None:
    """Start the sidecar of ``session_id`` unless one already answers.

    Processes racing here take turns on the start lock, so one sidecar
    starts; the others find it answering. Raises
    :class:`~fleetbus.errors.BrokerUnavailable` when it does not answer within
    ``timeout`` seconds.
    """
    if answers(session_id):
        return
    import fcntl

    deadline = time.monotonic() + timeout
    with open(sidecar_file(session_id, ".start"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if answers(session_id):
            return
        pid = agent_pid if agent_pid is not None else find_agent_pid()
        child = _spawn(session_id, agent=agent, cwd=cwd, agent_pid=pid)
        while time.monotonic() < deadline:
            if answers(session_id):
                return
            code = child.poll()
            if code == EXIT_BUSY:
                # It found a sidecar still holding the lifetime lock (one that
                # is shutting down); once that one is gone, try again.
                child = _spawn(session_id, agent=agent, cwd=cwd, agent_pid=pid)
            elif code is not None:
                raise unavailable(
                    f"the session sidecar exited with status {code} "
                    f"(see {sidecar_file(session_id, '.log')})"
                )
            time.sleep(_POLL_S)
    raise unavailable(
        f"the session sidecar did not start within {timeout:g}s "
        f"(see {sidecar_file(session_id, '.log')})"
    )


def _spawn(
    session_id: str, *, agent: str, cwd: str, agent_pid: int
) -> "subprocess.Popen[bytes]":
    import subprocess

    command = [
        sys.executable,
        "-m",
        "fleetbus.agents.sidecar",
        "--session-id",
        session_id,
        "--agent",
        agent,
        "--agent-pid",
        str(agent_pid),
        "--cwd",
        cwd,
    ]
    with open(sidecar_file(session_id, ".log"), "ab") as log:
        return subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            cwd=cwd if os.path.isdir(cwd) else None,
            start_new_session=True,
            close_fds=True,
        )


def find_agent_pid(env: dict[str, str] | None = None, start: int | None = None) -> int:
    """The process id of the agent that runs this process.

    ``FLEETBUS_AGENT_PID`` when set. Otherwise the nearest ancestor (from the
    parent up) whose command line looks like an agent; failing that, the
    grandparent when the parent is a shell (hooks run through ``sh -c``), else
    the parent.
    """
    source = os.environ if env is None else env
    explicit = source.get(AGENT_PID_ENV, "").strip()
    if explicit.isdigit():
        return int(explicit)
    parent = os.getppid() if start is None else start
    pid: int | None = parent
    for _ in range(32):
        if pid is None or pid <= 1:
            break
        if looks_like_agent(_cmdline(pid)):
            return pid
        pid = parent_of(pid)
    if _basename(_cmdline(parent)[:1]) in _SHELLS:
        grandparent = parent_of(parent)
        if grandparent is not None and grandparent > 1:
            return grandparent
    return parent


def looks_like_agent(argv: list[str]) -> bool:
    """Whether a command line is that of a coding agent (or of node running one)."""
    if not argv:
        return False
    name = _basename(argv[:1])
    if name == "node" or any(word in name for word in _AGENT_WORDS):
        return True
    script = argv[1].lower() if len(argv) > 1 else ""
    return name.startswith(("node", "bun", "python")) and any(
        word in script for word in _AGENT_WORDS
    )


def parent_of(pid: int) -> int | None:
    """The parent process id of ``pid`` from ``/proc``, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            text = stat.read().decode(errors="replace")
    except OSError:
        return None
    # The command name in parentheses may itself hold spaces and parentheses.
    fields = text.rpartition(")")[2].split()
    return int(fields[1]) if len(fields) > 1 and fields[1].isdigit() else None


def _cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            raw = cmdline.read()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def _basename(argv: list[str]) -> str:
    return os.path.basename(argv[0]).lower() if argv else ""


def session_from_ancestry(start: int | None = None) -> str | None:
    """The session of a running sidecar whose agent is an ancestor of this process.

    For agents that do not tell the commands they run which session they are
    (Codex): each sidecar names its session and its agent's pid on its command
    line, and its pid is in its lock file. ``start`` is the first process to
    look at (default: the parent).
    """
    agents: dict[int, str] = {}
    directory = runtime_dir()
    for name in os.listdir(directory):
        if name.startswith("sc-") and name.endswith(".lock"):
            found = _sidecar_of(os.path.join(directory, name))
            if found is not None:
                agents[found[0]] = found[1]
    pid: int | None = os.getppid() if start is None else start
    for _ in range(64):
        if not agents or pid is None or pid <= 1:
            break
        if pid in agents:
            return agents[pid]
        pid = parent_of(pid)
    return None


def _sidecar_of(lock: str) -> tuple[int, str] | None:
    """The agent pid and session id of the live sidecar that wrote ``lock``."""
    try:
        with open(lock) as handle:
            text = handle.read().strip()
    except OSError:
        return None
    argv = _cmdline(int(text)) if text.isdigit() else []
    if "fleetbus.agents.sidecar" not in argv:
        return None
    from itertools import pairwise

    options = dict(pairwise(argv))
    agent_pid = options.get("--agent-pid", "")
    session = options.get("--session-id")
    return (int(agent_pid), session) if agent_pid.isdigit() and session else None


def sidecar_pid(session_id: str) -> int | None:
    """The pid the running sidecar of ``session_id`` wrote to its lock file."""
    try:
        with open(sidecar_file(session_id, ".lock")) as lock:
            text = lock.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


# -- the hook's short way ---------------------------------------------------------

HOOK_MAGIC = b"fleetbus-hook/1"
"""The first word of a hook request to a sidecar, and of the reply."""

HOOK_ENVS = (
    "CLAUDE_CODE_SESSION_ID",
    "GEMINI_SESSION_ID",
    "FLEETBUS_AUTOCLAIM",
    "FLEETBUS_FAIL",
)
"""The environment variables a hook's answer depends on, passed to the sidecar."""

HOOK_DECLINED = HOOK_MAGIC + b" -\n"
"""The sidecar's reply when the hook must answer the event itself."""

_EVENT = ""
# Where each agent's hook finds its session, in order: the event's
# ``session_id`` (_EVENT) or an environment variable, as the adapters read them.
_HOOK_SESSIONS = {
    "claude-code": (_EVENT, "CLAUDE_CODE_SESSION_ID"),
    "codex": (_EVENT,),
    "gemini": ("GEMINI_SESSION_ID", _EVENT),
}
_SESSION_KEY = b'"session_id"'
_BLANK = b" \t\n\r"


def hook(argv: list[str]) -> int:
    """Run ``fleetbus hook AGENT ...``; ``argv`` starts with the agent's name.

    When the sidecar of the event's session runs, it answers the event as it
    came (:func:`answer_hook`). Anything else goes to the full hook,
    :func:`fleetbus.agents.hooks.main`, with the same input: no sidecar yet,
    an older one, an event this cannot read without a JSON parser, malformed
    input.
    """
    data = None
    if argv and sys.stdin is not None and sys.stdin.encoding == "utf-8":
        data = sys.stdin.buffer.read()
        answered = answer_hook(argv[0], data, os.environ)
        if answered is not None:
            sys.stdout.buffer.write(answered[1])
            return answered[0]
    from fleetbus.agents.hooks import main

    return main(argv, data)


def answer_hook(
    agent: str,
    data: bytes,
    env: "Mapping[str, str]",
    *,
    timeout: float = CALL_TIMEOUT_S,
) -> tuple[int, bytes] | None:
    """Exit status and stdout of ``fleetbus hook AGENT`` for the event ``data``.

    They come from the sidecar of the event's session, which reads the event
    with the same code as the full hook; None when no sidecar answers them.
    The request is one line, ``fleetbus-hook/1 AGENT ENV_BYTES EVENT_BYTES``,
    then the variables of :data:`HOOK_ENVS` that are set, as ``NAME=VALUE``
    each ended by a NUL, then the event.
    """
    session_id = hook_session(agent, data, env)
    if session_id is None:
        return None
    passed = b"".join(
        f"{name}={env[name]}\0".encode("utf-8", "surrogateescape")
        for name in HOOK_ENVS
        if name in env
    )
    head = b"%s %s %d %d\n" % (HOOK_MAGIC, agent.encode(), len(passed), len(data))
    try:
        path = sidecar_file(session_id, ".sock")
        sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    except OSError:
        return None
    try:
        sock.settimeout(timeout)
        sock.connect(path)
        sock.sendall(head + passed + data)
        reply = b"".join(_received(sock))
    except OSError:
        return None
    finally:
        sock.close()
    return read_hook_reply(reply)


def hook_session(agent: str, data: bytes, env: "Mapping[str, str]") -> str | None:
    """The session an agent's hook event belongs to, found without parsing JSON.

    None when the agent is unknown or the session cannot be told this way;
    the sidecar checks the answer against the event it parses.
    """
    for source in _HOOK_SESSIONS.get(agent, ()):
        value = env.get(source, "") if source else session_in(data)
        if value is None:
            return None
        if value:
            return value
    return None


def session_in(data: bytes) -> str | None:
    """The ``session_id`` of a JSON event, read as plain text.

    The first ``"session_id"`` key is taken; "" when there is none or it is
    empty; None when its value is not a string of printable ASCII without
    escapes, which only a JSON parser reads right.
    """
    at = data.find(_SESSION_KEY)
    if at < 0:
        return ""
    index = _skip_blank(data, at + len(_SESSION_KEY))
    if data[index : index + 1] != b":":
        return None
    index = _skip_blank(data, index + 1)
    if data[index : index + 1] != b'"':
        return None
    end = data.find(b'"', index + 1)
    value = data[index + 1 : end]
    if end < 0 or b"\\" in value or not value.isascii():
        return None
    text = value.decode()
    return text if text.isprintable() else None


def _skip_blank(data: bytes, index: int) -> int:
    while index < len(data) and data[index] in _BLANK:
        index += 1
    return index


def hook_reply(answer: tuple[int, bytes] | None) -> bytes:
    """The sidecar's reply to a hook: ``fleetbus-hook/1 STATUS SIZE``, stdout.

    :data:`HOOK_DECLINED` when ``answer`` is None.
    """
    if answer is None:
        return HOOK_DECLINED
    code, out = answer
    return b"%s %d %d\n%s" % (HOOK_MAGIC, code, len(out), out)


def read_hook_reply(reply: bytes) -> tuple[int, bytes] | None:
    """Exit status and stdout from a :func:`hook_reply`; None if it has none.

    An older sidecar answers the request line with a JSON error: None too.
    """
    head, _, out = reply.partition(b"\n")
    words = head.split(b" ")
    if len(words) != 3 or words[0] != HOOK_MAGIC:
        return None
    code, size = words[1], words[2]
    if not (code.isdigit() and size.isdigit() and int(size) == len(out)):
        return None
    return int(code), out


def read_hook_request(line: bytes) -> tuple[str, int, int] | None:
    """The agent and the sizes of the variables and event a hook request
    line announces; None when ``line`` is not one."""
    words = line.rstrip(b"\n").split(b" ")
    if len(words) != 4 or words[0] != HOOK_MAGIC:
        return None
    agent, env_size, size = words[1:]
    if not (env_size.isdigit() and size.isdigit()):
        return None
    return agent.decode(errors="replace"), int(env_size), int(size)


def read_hook_env(block: bytes) -> dict[str, str]:
    """The variables of a hook request, as :func:`answer_hook` wrote them."""
    env: dict[str, str] = {}
    for item in block.split(b"\0"):
        name, sep, value = item.partition(b"=")
        if sep:
            env[name.decode()] = value.decode("utf-8", "surrogateescape")
    return env
