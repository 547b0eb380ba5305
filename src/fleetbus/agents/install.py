"""Write fleetbus into each agent's configuration, and take it out again.

``fleetbus install TARGET`` merges our entries into the files an agent reads:

- ``claude-code``: hooks in ``.claude/settings.json``, the MCP server in
  ``.mcp.json``;
- ``codex``: hooks in ``.codex/hooks.json``, the MCP server in
  ``.codex/config.toml``;
- ``gemini``: hooks and the MCP server in ``.gemini/settings.json``;
- ``mcp``: only the MCP server, for all three;
- ``git``: the commit guard (:mod:`fleetbus.agents.gitguard`).

Every change is a merge: other hooks, other servers and other keys stay as
they were, and running the installer twice changes nothing. Our entries are
the ones whose command runs ``fleetbus hook`` or ``fleetbus mcp``, which is how
``--uninstall`` finds exactly what it added. A file that is not valid JSON (or
TOML) is reported and left untouched.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import sys
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fleetbus.errors import BadInput

AGENTS = ("claude-code", "codex", "gemini")
TARGETS = (*AGENTS, "git", "mcp")
SERVER_NAME = "fleetbus"
HOOK_MARK = "fleetbus hook"
MCP_MARK = "fleetbus mcp"
MEMORY_BEGIN = "<!-- fleetbus:begin -->"
MEMORY_END = "<!-- fleetbus:end -->"
TOML_BEGIN = "# fleetbus:begin"
TOML_END = "# fleetbus:end"

_AGENT_DIRS = frozenset({".claude", ".codex", ".gemini"})
MEMORY_FILES = {"claude-code": "CLAUDE.md", "codex": "AGENTS.md", "gemini": "GEMINI.md"}
_USER_MEMORY = {
    "claude-code": ".claude/CLAUDE.md",
    "codex": ".codex/AGENTS.md",
    "gemini": ".gemini/GEMINI.md",
}

SNIPPET = """\
## Working alongside other sessions (fleetbus)

Other agent sessions work in this repository at the same time. fleetbus
keeps you from overwriting each other:

- Your file edits are claimed for you. When an edit is refused because
  another session holds the file, do not work around it: work on something
  else, or wait for it with `fleetbus claim --wait 300 PATH --intent "..."`.
- Claim a whole area before a change that spans it:
  `fleetbus claim src/auth/ --intent "rename login()"`.
- When you learn something another session would want to know (a flaky
  test, a gotcha, a decision, a command that must not be run), publish it:
  `fleetbus fact src/auth/login.py --kind gotcha "login() caches the token"`.
  Keep facts short and tie them to the path or `@topic` they are about.
- Facts other sessions published about the files you touch are shown to you
  as they arrive; read them before you edit.
- Never commit with `--no-verify`: the pre-commit guard is what stops a
  commit on another session's files.
"""


@dataclass(frozen=True, slots=True)
class HookSpec:
    """One hook entry: the event, the tool matcher (if any) and the timeout."""

    event: str
    matcher: str | None
    timeout: int


# Hooks must answer fast: a timeout lets the tool call through, which is safe
# but loses the check. SessionEnd runs within the agent's short exit budget.
CLAUDE_HOOKS = (
    HookSpec("PreToolUse", "Edit|Write|MultiEdit|NotebookEdit", 15),
    HookSpec("PreToolUse", "Bash", 10),
    HookSpec("PostToolUse", "Bash", 10),
    HookSpec("SessionStart", None, 15),
    HookSpec("UserPromptSubmit", None, 10),
    HookSpec("SessionEnd", None, 2),
)
CODEX_HOOKS = (
    HookSpec("PreToolUse", "apply_patch|Edit|Write", 15),
    HookSpec("PreToolUse", "Bash", 10),
    HookSpec("PostToolUse", "Bash", 10),
    HookSpec("SessionStart", None, 15),
    HookSpec("UserPromptSubmit", None, 10),
)
# Gemini CLI counts hook timeouts in milliseconds.
GEMINI_HOOKS = (
    HookSpec("BeforeTool", "write_file|replace|run_shell_command", 15_000),
    # Gemini's BeforeTool cannot add context: facts on an edited file come
    # with AfterTool, and new facts for the session with BeforeAgent.
    HookSpec("AfterTool", "write_file|replace|run_shell_command", 10_000),
    HookSpec("BeforeAgent", None, 10_000),
    HookSpec("SessionStart", None, 15_000),
    HookSpec("SessionEnd", None, 2_000),
)
HOOK_SPECS = {"claude-code": CLAUDE_HOOKS, "codex": CODEX_HOOKS, "gemini": GEMINI_HOOKS}


@dataclass(frozen=True, slots=True)
class Change:
    """What one step did to one file: ``written``, ``removed`` or ``unchanged``."""

    path: Path
    action: str

    def __str__(self) -> str:
        return f"{self.action}: {self.path}"


def fleetbus_executable() -> str:
    """The absolute path of the ``fleetbus`` command of this installation."""
    beside = Path(sys.executable).parent / "fleetbus"
    if os.access(beside, os.X_OK):
        return str(beside.absolute())
    found = shutil.which("fleetbus")
    if found is None:
        raise BadInput(
            "cannot find the fleetbus command next to this Python or on PATH"
        )
    return str(Path(found).absolute())


# -- JSON configuration files ---------------------------------------------------


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object file; empty when absent, :class:`BadInput` when malformed."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise BadInput(f"cannot read {path}: {exc}") from exc
    if not text.strip():
        return {}
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise BadInput(
            f"{path} is not valid JSON ({exc}); fix it and run again, "
            "nothing was changed"
        ) from exc
    if not isinstance(data, dict):
        raise BadInput(f"{path} holds a JSON {type(data).__name__}, not an object")
    return data


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` as 2-space-indented JSON, atomically, keeping the mode."""
    _write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def update_json(
    path: Path, change: Callable[[dict[str, Any]], dict[str, Any]]
) -> Change:
    """Apply ``change`` to the object in ``path``; write only when it differs.

    A file that ends up empty is removed: it holds nothing worth keeping.
    """
    before = read_json(path)
    after = change(json.loads(json.dumps(before)))
    if after == before:
        return Change(path, "unchanged")
    if not after:
        return _remove(path)
    write_json(path, after)
    return Change(path, "written")


def _remove(path: Path) -> Change:
    """Remove ``path``, and its agent directory if that leaves it empty."""
    path.unlink(missing_ok=True)
    if path.parent.name in _AGENT_DIRS:
        with contextlib.suppress(OSError):
            path.parent.rmdir()
    return Change(path, "removed")


def _rewrite(path: Path, old: str, new: str) -> Change:
    """Replace ``old``, what ``path`` holds, by ``new``; remove it if left blank."""
    if new == old:
        return Change(path, "unchanged")
    if not new.strip():
        return _remove(path)
    _write_text(path, new)
    return Change(path, "written")


def _write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.fleetbus-tmp")
    temp.write_text(text, encoding="utf-8")
    try:
        mode = path.stat().st_mode & 0o7777
    except FileNotFoundError:
        mode = None
    if mode is not None:
        temp.chmod(mode)
    temp.replace(path)


# -- hooks ----------------------------------------------------------------------


def hook_command(fleetbus: str, agent: str) -> str:
    """The command line of our hooks for ``agent``."""
    return f"{shlex.quote(fleetbus)} hook {agent}"


def is_our_hook(hook: Any) -> bool:
    """Whether a hook entry is one of ours: its command runs ``fleetbus hook``."""
    return isinstance(hook, dict) and HOOK_MARK in _command_text(hook.get("command"))


def _command_text(command: Any) -> str:
    """A command as one line, to find ``fleetbus hook``/``fleetbus mcp`` in."""
    if isinstance(command, list):
        command = " ".join(str(part) for part in command)
    if not isinstance(command, str):
        return ""
    try:
        words = shlex.split(command)
    except ValueError:
        words = command.split()
    return " ".join([Path(words[0]).name, *words[1:]]) if words else ""


def add_hooks(
    settings: dict[str, Any], specs: tuple[HookSpec, ...], command: str
) -> dict[str, Any]:
    """``settings`` with our hooks merged in: updated in place, else appended."""
    hooks = _hooks_table(settings)
    for spec in specs:
        groups = hooks.setdefault(spec.event, [])
        if not isinstance(groups, list):
            raise BadInput(f"hooks.{spec.event} must be a list")
        entry = {"type": "command", "command": command, "timeout": spec.timeout}
        group = _our_group(groups, spec.matcher)
        if group is None:
            group = {} if spec.matcher is None else {"matcher": spec.matcher}
            group["hooks"] = []
            groups.append(group)
        ours = [hook for hook in group["hooks"] if is_our_hook(hook)]
        if ours:
            ours[0].update(entry)
        else:
            group["hooks"].append(entry)
    return settings


def remove_hooks(settings: dict[str, Any]) -> dict[str, Any]:
    """``settings`` without our hooks, and without what that left empty."""
    hooks = settings.get("hooks")
    if not isinstance(hooks, dict):
        return settings
    for event in list(hooks):
        groups = hooks[event]
        if not isinstance(groups, list):
            continue
        kept = []
        for group in groups:
            inner = group.get("hooks") if isinstance(group, dict) else None
            if not isinstance(inner, list) or not any(map(is_our_hook, inner)):
                kept.append(group)
                continue
            group["hooks"] = [hook for hook in inner if not is_our_hook(hook)]
            if group["hooks"]:
                kept.append(group)
        if kept:
            hooks[event] = kept
        else:
            del hooks[event]
    if not hooks:
        del settings["hooks"]
    return settings


def _hooks_table(settings: dict[str, Any]) -> dict[str, Any]:
    hooks = settings.setdefault("hooks", {})
    if not isinstance(hooks, dict):
        raise BadInput("the 'hooks' key must hold an object")
    return hooks


def _our_group(groups: list[Any], matcher: str | None) -> dict[str, Any] | None:
    """The group for ``matcher`` that already holds our hook, if there is one."""
    for group in groups:
        if not isinstance(group, dict) or group.get("matcher") != matcher:
            continue
        inner = group.get("hooks")
        if isinstance(inner, list) and any(map(is_our_hook, inner)):
            return group
    return None


# -- MCP servers ----------------------------------------------------------------


def mcp_entry(fleetbus: str) -> dict[str, Any]:
    """Our MCP server as ``mcpServers`` entries name it."""
    return {"command": fleetbus, "args": ["mcp"]}


def is_our_server(entry: Any) -> bool:
    """Whether an ``mcpServers`` entry runs ``fleetbus mcp``."""
    if not isinstance(entry, dict):
        return False
    args = entry.get("args") or []
    words = [entry.get("command", ""), *args] if isinstance(args, list) else []
    return MCP_MARK in _command_text(words)


def add_server(settings: dict[str, Any], fleetbus: str) -> dict[str, Any]:
    """``settings`` with our server in ``mcpServers``, updating ours in place."""
    servers = settings.setdefault("mcpServers", {})
    if not isinstance(servers, dict):
        raise BadInput("the 'mcpServers' key must hold an object")
    name = next((k for k, v in servers.items() if is_our_server(v)), SERVER_NAME)
    current = servers.get(name)
    if current is not None and not is_our_server(current):
        raise BadInput(
            f"an MCP server named {name!r} is already configured and does not "
            "run fleetbus; rename it and run again"
        )
    servers[name] = {**(current or {}), **mcp_entry(fleetbus)}
    return settings


def remove_server(settings: dict[str, Any]) -> dict[str, Any]:
    """``settings`` without our ``mcpServers`` entries."""
    servers = settings.get("mcpServers")
    if not isinstance(servers, dict):
        return settings
    for name in [k for k, v in servers.items() if is_our_server(v)]:
        del servers[name]
    if not servers:
        del settings["mcpServers"]
    return settings


def toml_block(fleetbus: str) -> str:
    """Our MCP server as a Codex ``config.toml`` table, between marker lines."""
    return (
        f"{TOML_BEGIN}\n[mcp_servers.{SERVER_NAME}]\n"
        f'command = {json.dumps(fleetbus)}\nargs = ["mcp"]\n{TOML_END}\n'
    )


def update_codex_toml(path: Path, fleetbus: str | None) -> Change:
    """Put our block into (or, with ``fleetbus=None``, take it out of) ``path``."""
    text, parsed = _read_toml(path)
    rest = _cut_block(text, TOML_BEGIN, TOML_END)
    if fleetbus is None:
        new = rest
    else:
        if rest == text and SERVER_NAME in parsed.get("mcp_servers", {}):
            raise BadInput(
                f"{path} already configures an MCP server named {SERVER_NAME!r}; "
                "remove or rename it and run again"
            )
        new = _append_block(rest, toml_block(fleetbus))

    return _rewrite(path, text, new)


# -- memory files ---------------------------------------------------------------


def memory_block() -> str:
    """The instructions snippet between its marker comments."""
    return f"{MEMORY_BEGIN}\n{SNIPPET}{MEMORY_END}\n"


def update_memory(path: Path, add: bool) -> Change:
    """Append the snippet to a memory file (replacing ours), or take it out."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        text = ""
    rest = _cut_block(text, MEMORY_BEGIN, MEMORY_END)
    new = _append_block(rest, memory_block()) if add else rest

    return _rewrite(path, text, new)


def _cut_block(text: str, begin: str, end: str) -> str:
    """``text`` without the lines from ``begin`` to ``end``, and the blank before."""
    lines = text.splitlines(keepends=True)
    starts = [i for i, line in enumerate(lines) if line.strip() == begin]
    if not starts:
        return text
    start = starts[0]
    stop = next(
        (i for i in range(start, len(lines)) if lines[i].strip() == end), len(lines)
    )
    if start > 0 and not lines[start - 1].strip():
        start -= 1
    return "".join(lines[:start] + lines[stop + 1 :])


def _append_block(text: str, block: str) -> str:
    if not text:
        return block
    return text + ("" if text.endswith("\n") else "\n") + "\n" + block


# -- targets --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Places:
    """Where one agent's files are, for a repository or for the user."""

    base: Path
    user: bool

    def hooks_file(self, agent: str) -> Path:
        """The file that holds the agent's hooks."""
        name = {
            "claude-code": ".claude/settings.json",
            "codex": ".codex/hooks.json",
            "gemini": ".gemini/settings.json",
        }[agent]
        return self.base / name

    def mcp_file(self, agent: str) -> Path | None:
        """The file that lists the agent's MCP servers, where we may write it.

        Claude Code keeps user-level servers in a file it manages itself; for
        those, ``claude mcp add --scope user`` is the way (see ``--print``).
        """
        if agent == "claude-code":
            return None if self.user else self.base / ".mcp.json"
        if agent == "codex":
            return self.base / ".codex" / "config.toml"
        return self.base / ".gemini" / "settings.json"

    def memory_file(self, agent: str) -> Path:
        """The agent's memory (instructions) file."""
        if self.user:
            return self.base / _USER_MEMORY[agent]
        return self.base / MEMORY_FILES[agent]


def places(repo: str | Path | None, *, user: bool) -> Places:
    """The files of a repository's worktree root, or of the user's home."""
    if user:
        return Places(Path.home(), user=True)
    from fleetbus.repo import discover

    return Places(discover(repo).root, user=False)


def install_agent(
    agent: str,
    where: Places,
    *,
    fleetbus: str,
    uninstall: bool = False,
    mcp: bool = True,
    memory: bool = False,
) -> list[Change]:
    """Install (or remove) one agent's hooks, MCP server and memory snippet.

    Every file is read and checked before any is written, so a malformed one
    stops the whole step with nothing changed.
    """
    if agent not in AGENTS:
        raise BadInput(f"unknown agent {agent!r} (known: {', '.join(AGENTS)})")
    hooks_path = where.hooks_file(agent)
    mcp_path = where.mcp_file(agent) if mcp else None
    _check_readable(hooks_path, mcp_path)
    command = hook_command(fleetbus, agent)
    specs = HOOK_SPECS[agent]

    def hooks(settings: dict[str, Any]) -> dict[str, Any]:
        if uninstall:
            return remove_hooks(settings)
        return add_hooks(settings, specs, command)

    changes = [update_json(hooks_path, hooks)]
    if mcp_path is not None:
        changes.append(_update_server(mcp_path, fleetbus, uninstall=uninstall))
    if memory or uninstall:
        changes.append(update_memory(where.memory_file(agent), add=not uninstall))
    return changes


def install_mcp(
    where: Places, *, fleetbus: str, uninstall: bool = False
) -> list[Change]:
    """Install (or remove) the MCP server for every agent that has a file for it."""
    paths = [p for p in map(where.mcp_file, AGENTS) if p is not None]
    _check_readable(*paths)
    return [_update_server(path, fleetbus, uninstall=uninstall) for path in paths]


def _update_server(path: Path, fleetbus: str, *, uninstall: bool) -> Change:
    if path.suffix == ".toml":
        return update_codex_toml(path, None if uninstall else fleetbus)
    if uninstall:
        return update_json(path, remove_server)
    return update_json(path, lambda data: add_server(data, fleetbus))


def _check_readable(*paths: Path | None) -> None:
    for path in paths:
        if path is None:
            continue
        if path.suffix == ".toml":
            _read_toml(path)
        else:
            read_json(path)


def _read_toml(path: Path) -> tuple[str, dict[str, Any]]:
    """A TOML file's text and content; empty when absent, BadInput if malformed."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return "", {}
    except OSError as exc:
        raise BadInput(f"cannot read {path}: {exc}") from exc
    try:
        return text, tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise BadInput(
            f"{path} is not valid TOML ({exc}); nothing was changed"
        ) from exc


def install_git(
    repo: str | Path | None, *, fleetbus: str, uninstall: bool
) -> list[Change]:
    """Install (or remove) the commit guard's git hooks."""
    from fleetbus.agents import gitguard

    target = Path(repo) if repo is not None else Path.cwd()
    if uninstall:
        return [Change(path, "removed") for path in gitguard.uninstall(target)]
    return [Change(path, "written") for path in gitguard.install(target, fleetbus)]


def claude_user_mcp_hint(fleetbus: str) -> str:
    """How to register the MCP server for Claude Code at user level."""
    return f"claude mcp add --scope user {SERVER_NAME} -- {shlex.quote(fleetbus)} mcp"


def run(
    target: str,
    *,
    repo: str | None = None,
    user: bool = False,
    uninstall: bool = False,
    memory: bool = False,
    print_snippet: bool = False,
) -> int:
    """What ``fleetbus install`` does; prints each change, returns the exit code."""
    if target not in TARGETS:
        raise BadInput(f"unknown target {target!r} (known: {', '.join(TARGETS)})")
    if print_snippet:
        print(SNIPPET, end="")
        return 0
    fleetbus = fleetbus_executable()
    if target == "git":
        if user:
            raise BadInput("the git guard is installed per repository, not per user")
        changes = install_git(repo, fleetbus=fleetbus, uninstall=uninstall)
    elif target == "mcp":
        changes = install_mcp(
            places(repo, user=user), fleetbus=fleetbus, uninstall=uninstall
        )
    else:
        where = places(repo, user=user)
        changes = install_agent(
            target, where, fleetbus=fleetbus, uninstall=uninstall, memory=memory
        )
    # Gemini CLI keeps hooks and MCP servers in one file: say each file once.
    last: dict[Path, Change] = {}
    for change in changes:
        if change.action != "unchanged" or change.path not in last:
            last[change.path] = change
    for change in last.values():
        if change.action != "unchanged" or change.path.exists():
            print(change)
    if user and target in ("claude-code", "mcp") and not uninstall:
        print(f"for Claude Code's MCP server, run: {claude_user_mcp_hint(fleetbus)}")
    return 0
