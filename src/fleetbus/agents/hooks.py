"""``fleetbus hook AGENT``: what a coding agent runs before and after tool calls.

The agent writes one JSON event on stdin and reads the answer on stdout. Each
agent module (:mod:`~fleetbus.agents.claude`, :mod:`~fleetbus.agents.codex`,
:mod:`~fleetbus.agents.gemini`) turns its agent's event into an
:class:`Action` and an :class:`Outcome` back into that agent's JSON; the work
in between is here and is the same for every agent: ask the session's sidecar
(started on the first call) and phrase its answer for the model.

This runs on every tool call, so it imports only the standard library; the
sidecar does everything that needs the fleetbus client. Once a session's
sidecar runs, ``fleetbus hook`` does not even come here: the sidecar reads the
event and renders the answer with this same code (:func:`request`,
:func:`settle`, :func:`answer_text`), and the hook process only passes bytes
along (:func:`fleetbus.agents.hookclient.hook`).

Exit status: 0 with the answer (or nothing) on stdout; 1 with one line on
stderr when the input is malformed, which every agent treats as a
non-blocking error.
"""

from __future__ import annotations

import json
import os
import sys
import time

from fleetbus.agents import hookclient

# Each hook run pays for every import, so the typing-only ones stay out of it.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping
    from typing import Any, Protocol

    from fleetbus.errors import FleetbusError

    class Adapter(Protocol):
        """The part of a hook that speaks one agent's protocol."""

        NO_ANSWER: dict[str, Any] | None
        """The answer to an event fleetbus does not act on."""

        def parse(self, event: dict[str, Any], env: Mapping[str, str]) -> Action | None:
            """The action an event asks for; None when there is nothing to do."""

        def render(self, action: Action, outcome: Outcome) -> dict[str, Any] | None:
            """The agent's JSON answer; None for no answer at all."""


AGENTS = {"claude-code": "claude", "codex": "codex", "gemini": "gemini"}
"""The agents ``fleetbus hook`` knows, and the module that speaks for each."""

FAIL_ENV = "FLEETBUS_FAIL"
AUTOCLAIM_ENV = "FLEETBUS_AUTOCLAIM"
GUARD_MARKER = "# fleetbus-guard"
"""The line that marks the git guard's hook (:data:`gitguard.MARKER`)."""

CONTEXT_CAP = 4000
"""Most characters of context added per answer (agents cut at 10,000)."""

FACT_TEXT_CAP = 600
"""Most characters of one fact's text in context, so that one long fact (they
may hold 4 KiB) cannot crowd out every other one, or itself, from the cap."""

# Most severe first: a warning or gotcha must not be crowded out by notes.
_SEVERITY = {"warning": 0, "gotcha": 1, "decision": 2, "question": 3, "note": 4}
_FALSE = frozenset({"0", "false", "no", "off"})


class MalformedEvent(ValueError):
    """The agent's event is not what its hook protocol says."""


class Action:
    """What a hook event asks of fleetbus, whatever the agent.

    ``kind`` is one of ``edit`` (before a file edit: claim or deny),
    ``edited`` (after one: facts only), ``bash`` and ``bashed`` (before and
    after a shell command), ``start``, ``prompt`` and ``end``. ``paths`` are
    absolute. ``facts`` is false where the agent cannot show context with
    this event (the facts then wait for one that can).
    """

    __slots__ = (
        "agent",
        "command",
        "cwd",
        "event",
        "facts",
        "kind",
        "paths",
        "session_id",
    )

    def __init__(
        self,
        kind: str,
        agent: str,
        event: str,
        session_id: str,
        cwd: str,
        *,
        paths: tuple[str, ...] = (),
        command: str = "",
        facts: bool = True,
    ) -> None:
        self.kind = kind
        self.agent = agent
        self.event = event
        self.session_id = session_id
        self.cwd = cwd
        self.paths = paths
        self.command = command
        self.facts = facts

    def __repr__(self) -> str:
        return (
            f"<Action {self.kind} {self.agent}/{self.event} paths={self.paths!r} "
            f"command={self.command!r}>"
        )

    def but(
        self,
        kind: str,
        *,
        paths: tuple[str, ...] = (),
        command: str = "",
        facts: bool = True,
    ) -> Action:
        """This action's agent, event, session and cwd, with a kind and payload."""
        return Action(
            kind,
            self.agent,
            self.event,
            self.session_id,
            self.cwd,
            paths=paths,
            command=command,
            facts=facts,
        )


class Outcome:
    """What to tell the agent: a denial reason, context for the model, a warning.

    ``details`` is the sidecar's reply, for callers that want more than text.
    """

    __slots__ = ("context", "deny", "details", "warning")

    def __init__(
        self,
        *,
        deny: str | None = None,
        context: str = "",
        warning: str = "",
        details: dict[str, Any] | None = None,
    ) -> None:
        self.deny = deny
        self.context = context
        self.warning = warning
        self.details = details or {}

    def __repr__(self) -> str:
        return f"<Outcome deny={self.deny is not None} warning={self.warning!r}>"


def main(argv: list[str] | None = None, data: bytes | None = None) -> int:
    """Run one hook: ``fleetbus hook AGENT`` with the event on stdin.

    ``data`` is the event's bytes when the caller has read stdin already.
    """
    args = sys.argv[1:] if argv is None else argv
    adapter = agent_adapter(args[0]) if args else None
    if adapter is None:
        known = ", ".join(AGENTS)
        print(f"fleetbus hook: name the agent, one of: {known}", file=sys.stderr)
        return 1
    try:
        if data is None:
            text = sys.stdin.read()
        else:
            text = data.decode(sys.stdin.encoding, sys.stdin.errors or "strict")
        event = json.loads(text)
        if not isinstance(event, dict):
            raise MalformedEvent("the event is not a JSON object")
        answer = respond(adapter, event, os.environ)
    except (ValueError, MalformedEvent) as exc:
        print(f"fleetbus hook {args[0]}: malformed event: {exc}", file=sys.stderr)
        return 1
    sys.stdout.write(answer_text(answer))
    return 0


def agent_adapter(agent: str) -> Adapter | None:
    """The module that speaks ``agent``'s protocol; None for an unknown agent."""
    module = AGENTS.get(agent)
    if module is None:
        return None
    adapter: Adapter = __import__(f"fleetbus.agents.{module}", fromlist=["parse"])
    return adapter


def answer_text(answer: dict[str, Any] | None) -> str:
    """What a hook writes on stdout for ``answer``: a JSON line, or nothing."""
    return "" if answer is None else json.dumps(answer) + "\n"


def respond(
    adapter: Adapter, event: dict[str, Any], env: Mapping[str, str]
) -> dict[str, Any] | None:
    """The answer to one event: parse it, act through the sidecar, render."""
    action = adapter.parse(event, env)
    if action is None:
        return adapter.NO_ANSWER
    try:
        outcome = perform(action, env)
    except Exception as exc:
        # fleetbus.errors is imported here, on the way out, to keep it (and
        # ``typing``) off the path of every successful hook.
        from fleetbus.errors import BrokerUnavailable, FleetbusError

        if isinstance(exc, FleetbusError):
            outcome = unavailable(action, exc, env)
        elif isinstance(exc, OSError):
            # No runtime directory or no process to spare: as if no broker.
            problem = BrokerUnavailable(f"the session sidecar cannot run: {exc}")
            outcome = unavailable(action, problem, env)
        else:
            raise
    return adapter.render(action, outcome)


def perform(action: Action, env: Mapping[str, str]) -> Outcome:
    """Do what ``action`` asks, through the session's sidecar."""
    if action.kind == "bash":
        refusal = no_verify_refusal(action.command, action.cwd)
        if refusal:
            return Outcome(deny=refusal)
    if action.kind == "end":
        if hookclient.answers(action.session_id):
            call(action, request(action, env))
        return Outcome()
    hookclient.ensure_sidecar(
        action.session_id,
        agent=action.agent,
        cwd=action.cwd,
        agent_pid=_agent_pid(env),
    )
    return outcome(action, call(action, request(action, env)))


def call(action: Action, request: dict[str, Any]) -> dict[str, Any]:
    """One request to the sidecar of ``action``'s session."""
    return hookclient.call_sidecar(action.session_id, request)


def _agent_pid(env: Mapping[str, str]) -> int | None:
    text = env.get(hookclient.AGENT_PID_ENV, "").strip()
    return int(text) if text.isdigit() else None


_OPS = {
    "edit": "pre_edit",
    "edited": "facts_for",
    "bash": "pre_bash",
    "bashed": "post_bash",
    "start": "start",
    "prompt": "prompt",
    "end": "end",
}


def request(action: Action, env: Mapping[str, str]) -> dict[str, Any]:
    """The sidecar request that carries out ``action``."""
    sent: dict[str, Any] = {"op": _OPS[action.kind]}
    if action.kind == "edit":
        sent.update(paths=list(action.paths), facts=action.facts)
        autoclaim = env.get(AUTOCLAIM_ENV)
        if autoclaim is not None:
            sent["autoclaim"] = autoclaim.strip().lower() not in _FALSE
    elif action.kind == "edited":
        sent["paths"] = list(action.paths)
    return sent


def outcome(action: Action, reply: dict[str, Any]) -> Outcome:
    """What to tell the agent, from the sidecar's reply to :func:`request`."""
    kind = action.kind
    if kind == "edit":
        context = facts_text(reply.get("facts", []))
        if reply.get("deny"):
            reason = denial_text(reply.get("holders", []), reply.get("inside", []))
            return Outcome(deny=reason, context=context, details=reply)
        return Outcome(context=context, details=reply)
    if kind in ("edited", "prompt"):
        return Outcome(context=facts_text(reply.get("facts", [])), details=reply)
    if kind == "bashed":
        return Outcome(context=changed_text(reply.get("conflicts", [])), details=reply)
    if kind == "start":
        return Outcome(context=summary_text(reply), details=reply)
    return Outcome()


def settle(action: Action, reply: dict[str, Any], env: Mapping[str, str]) -> Outcome:
    """The outcome of ``action`` from the sidecar's reply as it is sent: ok, or
    an error that :func:`unavailable` phrases, as :func:`respond` does."""
    if reply.get("ok"):
        return outcome(action, reply)
    from fleetbus.errors import error_from_wire

    return unavailable(action, error_from_wire(reply.get("error") or {}), env)


def runs_git(action: Action) -> bool:
    """Whether answering ``action`` runs git in the agent's environment: the
    check for the git guard before a ``git commit --no-verify``."""
    command = action.command
    return action.kind == "bash" and "commit" in command and skips_verify(command)


def unavailable(action: Action, exc: FleetbusError, env: Mapping[str, str]) -> Outcome:
    """What to say when the sidecar or the broker cannot answer.

    Edits go ahead with a warning to the user (fail open), or are denied when
    ``FLEETBUS_FAIL=closed``. Other events stay quiet: the warning on the
    next edit is enough.
    """
    message = " ".join(exc.message.split())
    if action.kind != "edit" and action.kind != "start":
        return Outcome()
    if action.kind == "edit" and env.get(FAIL_ENV, "").strip().lower() == "closed":
        return Outcome(
            deny=(
                f"fleetbus could not check whether another session holds this file "
                f"({message}), and FLEETBUS_FAIL=closed blocks edits until it can. "
                "Tell the user the fleetbus broker is unreachable "
                "(`fleetbus status` shows it)."
            )
        )
    return Outcome(
        warning=f"fleetbus: {message}; edits are not coordinated with other sessions"
    )


# -- phrasing for the model -----------------------------------------------------


def denial_text(holders: list[dict[str, Any]], paths: list[str]) -> str:
    """Why an edit is refused: who holds what, why, since when; what to do."""
    target = ", ".join(paths) or "this file"
    lines = [f"fleetbus: {target} is claimed by another session working here."]
    for holder in holders[:5]:
        shared = " (shared)" if holder.get("mode") == "shared" else ""
        intent = holder.get("intent") or "no intent given"
        lines.append(
            f"- {holder.get('scope')}{shared} is held by {holder.get('name')} "
            f"since {_when(holder.get('since'))}; intent: {intent}"
        )
    if len(holders) > 5:
        lines.append(f"- and {len(holders) - 5} more claims")
    first = paths[0] if paths else "PATH"
    lines.append(
        "Do not edit it now, and do not work around this by writing the file "
        "another way. Work on something else meanwhile, or wait for it with "
        f"`fleetbus claim --wait 300 {first}` (it returns once the claim is "
        "yours), then edit."
    )
    return "\n".join(lines)


def facts_text(facts: list[dict[str, Any]], cap: int = CONTEXT_CAP) -> str:
    """Facts for the model, most severe and newest first, within ``cap``."""
    if not facts:
        return ""
    ordered = sorted(
        facts,
        key=lambda f: (_SEVERITY.get(str(f.get("kind")), 5), -_number(f.get("seq"))),
    )
    head = "fleetbus: facts other sessions shared about what you are touching:"
    return _capped(head, [_fact_line(fact) for fact in ordered], cap, "facts")


def _fact_line(fact: dict[str, Any]) -> str:
    topics = ", ".join(str(t) for t in fact.get("topics") or [])
    author = fact.get("name") or fact.get("author") or fact.get("sid") or "someone"
    body = " ".join(str(fact.get("body", "")).split())
    if len(body) > FACT_TEXT_CAP:
        body = body[: FACT_TEXT_CAP - 1] + "…"
    return (
        f"- [{fact.get('kind', 'note')}] {topics}: {body} "
        f"({author}, {_when(fact.get('at'))})"
    )


def changed_text(conflicts: list[dict[str, Any]]) -> str:
    """Files a shell command changed that other sessions hold."""
    if not conflicts:
        return ""
    lines = []
    for conflict in conflicts:
        names = ", ".join(
            f"{h.get('name')} (intent: {h.get('intent') or 'none given'})"
            for h in conflict.get("holders", [])
        )
        lines.append(f"- {conflict.get('path')}: held by {names}")
    head = (
        "fleetbus: that command changed files other sessions hold. Undo those "
        "changes (or ask the holder) before going on; their work would "
        "collide with yours:"
    )
    return _capped(head, lines, CONTEXT_CAP, "files")


def summary_text(reply: dict[str, Any]) -> str:
    """Who else works in this repository, on what, and facts not seen yet."""
    sessions = reply.get("sessions", [])
    lines = [f"fleetbus: this session is {reply.get('name')} in a shared repository."]
    if not sessions:
        lines.append("No other session is working here now.")
    else:
        lines.append("Other sessions working here now:")
    for info in sessions[:10]:
        meta = info.get("meta") or {}
        where = ", ".join(str(v) for v in (meta.get("branch"), meta.get("host")) if v)
        claims = info.get("claims", [])
        held = "; ".join(
            f"{c.get('scope')} ({c.get('intent') or 'no intent'})" for c in claims[:8]
        )
        more = f" and {len(claims) - 8} more" if len(claims) > 8 else ""
        lines.append(
            f"- {info.get('name')}"
            + (f" [{where}]" if where else "")
            + (f": holds {held}{more}" if claims else ": holds nothing")
        )
    if len(sessions) > 10:
        lines.append(f"- and {len(sessions) - 10} more sessions")
    lines.append(
        "Edits to files another session holds are refused with the holder's "
        "name; `fleetbus claims` lists every claim."
    )
    text = "\n".join(lines)
    facts = facts_text(reply.get("facts", []), cap=CONTEXT_CAP - len(text) - 1)
    return f"{text}\n{facts}" if facts else text


def _capped(head: str, lines: list[str], cap: int, what: str) -> str:
    kept = [head]
    size = len(head)
    for index, line in enumerate(lines):
        rest = len(lines) - index
        tail = f"- and {rest} more {what} (`fleetbus facts` shows them)"
        if size + 1 + len(line) + 1 + len(tail) > cap:
            kept.append(tail if what == "facts" else f"- and {rest} more {what}")
            break
        kept.append(line)
        size += 1 + len(line)
    return "\n".join(kept)[:cap]


def _number(value: Any) -> float:
    return float(value) if isinstance(value, int | float) else 0.0


def _when(wall: Any) -> str:
    """A wall time as ``HH:MM UTC (N min ago)``."""
    if not isinstance(wall, int | float):
        return "an unknown time"
    ago = max(0, int(time.time() - wall))
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(wall))
    if ago < 60:
        return f"{stamp} ({ago} s ago)"
    if ago < 7200:
        return f"{stamp} ({ago // 60} min ago)"
    return f"{stamp} ({ago // 3600} h ago)"


# -- git commit --no-verify -----------------------------------------------------


def no_verify_refusal(command: str, cwd: str) -> str | None:
    """Why a shell command may not run: it skips the git guard; else None."""
    if "commit" not in command or not skips_verify(command):
        return None
    if not guard_installed(cwd):
        return None
    return (
        "fleetbus: `git commit --no-verify` (or `-n`) is refused here: it would "
        "skip the pre-commit guard that stops commits touching files other "
        "sessions hold. Commit without it; if the guard refuses, it names the "
        "files and their holders."
    )


def skips_verify(command: str) -> bool:
    """Whether a shell command runs ``git commit`` with ``--no-verify`` or ``-n``."""
    import shlex

    try:
        lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        tokens = list(lexer)
    except ValueError:
        # Unbalanced quotes: judge the text itself, conservatively.
        return "--no-verify" in command
    simple: list[str] = []
    for token in [*tokens, ";"]:
        if token and set(token) <= set(";&|()"):
            if _commit_skips_verify(simple):
                return True
            simple = []
        else:
            simple.append(token)
    return False


# Options of git itself and of git commit that take the next word as a value.
_GIT_VALUED = frozenset({"-C", "-c", "--git-dir", "--work-tree", "--namespace"})
_COMMIT_VALUED = "mFcCtS"
_COMMIT_LONG_VALUED = frozenset(
    {
        "--message",
        "--file",
        "--author",
        "--date",
        "--template",
        "--reuse-message",
        "--reedit-message",
        "--fixup",
        "--squash",
        "--cleanup",
        "--trailer",
        "--pathspec-from-file",
    }
)


def _commit_skips_verify(words: list[str]) -> bool:
    index = next((i for i, w in enumerate(words) if os.path.basename(w) == "git"), None)
    if index is None:
        return False
    index += 1
    while index < len(words) and words[index].startswith("-"):
        index += 2 if words[index] in _GIT_VALUED else 1
    if index >= len(words) or words[index] != "commit":
        return False
    rest = iter(words[index + 1 :])
    for word in rest:
        if word == "--":
            return False
        if word == "--no-verify":
            return True
        if word in _COMMIT_LONG_VALUED:
            next(rest, None)
        elif word.startswith("-") and not word.startswith("--"):
            skips, takes_value = _short_options(word[1:])
            if skips:
                return True
            if takes_value:
                next(rest, None)
    return False


def _short_options(letters: str) -> tuple[bool, bool]:
    """For a cluster of short options (``-anm``): has it ``-n``, and does its
    last option take the next word as its value?"""
    for index, letter in enumerate(letters):
        if letter == "n":
            return True, False
        if letter in _COMMIT_VALUED:
            return False, index == len(letters) - 1
    return False, False


def guard_installed(cwd: str) -> bool:
    """Whether the git guard's pre-commit hook is installed for ``cwd``'s repo."""
    import subprocess

    try:
        done = subprocess.run(
            ["git", "-C", cwd, "rev-parse", "--git-path", "hooks"],
            capture_output=True,
            text=True,
            check=False,
        )
    except OSError:
        return False
    if done.returncode != 0:
        return False
    hooks = done.stdout.strip()
    path = os.path.join(cwd, hooks, "pre-commit")
    try:
        with open(path, encoding="utf-8", errors="replace") as hook:
            return any(line.strip() == GUARD_MARKER for line in hook)
    except OSError:
        return False


# -- reading events -------------------------------------------------------------


def text_field(event: Mapping[str, Any], key: str) -> str:
    """A string field of an event, or :class:`MalformedEvent`."""
    value = event.get(key)
    if not isinstance(value, str):
        raise MalformedEvent(f"{key!r} is missing or not a string")
    return value


def tool_input(event: Mapping[str, Any]) -> dict[str, Any]:
    """The ``tool_input`` object of a tool event, or :class:`MalformedEvent`."""
    value = event.get("tool_input")
    if not isinstance(value, dict):
        raise MalformedEvent("'tool_input' is missing or not an object")
    return value


def input_path(arguments: Mapping[str, Any], tool: str, key: str) -> str:
    """The path a tool's input carries under ``key``, or :class:`MalformedEvent`."""
    value = arguments.get(key)
    if not isinstance(value, str) or not value:
        raise MalformedEvent(f"{tool} input has no {key!r}")
    return value


def input_command(arguments: Mapping[str, Any], tool: str) -> str:
    """The shell command a tool's input carries, or :class:`MalformedEvent`."""
    value = arguments.get("command")
    if not isinstance(value, str):
        raise MalformedEvent(f"{tool} input has no 'command'")
    return value


def absolute(path: str, cwd: str) -> str:
    """``path`` made absolute against the agent's working directory."""
    return path if os.path.isabs(path) else os.path.join(cwd, path)


def event_cwd(event: Mapping[str, Any]) -> str:
    """The agent's working directory: the event's ``cwd``, else ours."""
    value = event.get("cwd")
    return value if isinstance(value, str) and value else os.getcwd()


if __name__ == "__main__":
    sys.exit(main())
