"""Codex CLI's side of ``fleetbus hook codex``.

Codex sends ``PreToolUse`` for ``apply_patch`` with the raw patch in
``tool_input.command``; the files it touches are on its ``*** Add File:``,
``*** Update File:``, ``*** Delete File:`` and ``*** Move to:`` lines.
``Bash`` commands come as ``PreToolUse``/``PostToolUse`` with
``tool_input.command`` (a patch fed to ``apply_patch`` through the shell
counts as an edit too). ``SessionStart`` and ``UserPromptSubmit`` are as in
Claude Code; Codex has no session-end event, so the sidecar ends with the
Codex process. Answers have Claude Code's shape: Codex reads
``hookSpecificOutput.permissionDecision``, ``permissionDecisionReason`` and
``additionalContext``, and ``systemMessage``.
"""

from __future__ import annotations

from fleetbus.agents.claude import render_hook_output
from fleetbus.agents.hooks import (
    Action,
    MalformedEvent,
    Outcome,
    absolute,
    event_cwd,
    input_path,
    text_field,
    tool_input,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping
    from typing import Any

AGENT = "codex"
PATCH_TOOLS = frozenset({"apply_patch"})
FILE_TOOLS = {"Edit": "file_path", "Write": "file_path"}
SHELL_TOOLS = frozenset({"Bash", "shell", "exec_command", "local_shell"})
PATCH_MARKERS = (
    "*** Add File:",
    "*** Update File:",
    "*** Delete File:",
    "*** Move to:",
)
_LIFECYCLE = {"SessionStart": "start", "UserPromptSubmit": "prompt"}
NO_ANSWER = None
"""No output at all: Codex then goes on as if there were no hook."""


def parse(event: dict[str, Any], env: Mapping[str, str]) -> Action | None:
    """The action a Codex hook event asks for, if any."""
    name = text_field(event, "hook_event_name")
    cwd = event_cwd(event)
    session_id = text_field(event, "session_id")
    if not session_id:
        raise MalformedEvent("'session_id' is empty")
    base = Action("none", AGENT, name, session_id, cwd)
    if name in _LIFECYCLE:
        return base.but(_LIFECYCLE[name])
    if name not in ("PreToolUse", "PostToolUse"):
        return None
    tool = text_field(event, "tool_name")
    if tool in PATCH_TOOLS or tool in FILE_TOOLS:
        if name != "PreToolUse":
            return None
        paths = _edited_paths(tool, tool_input(event))
        return base.but("edit", paths=tuple(absolute(p, cwd) for p in paths))
    if tool in SHELL_TOOLS:
        command = _command_text(tool_input(event))
        if name == "PreToolUse" and "*** Begin Patch" in command:
            paths = patch_paths(command)
            if paths:
                absolute_paths = tuple(absolute(p, cwd) for p in paths)
                return base.but("edit", paths=absolute_paths)
        kind = "bash" if name == "PreToolUse" else "bashed"
        return base.but(kind, command=command)
    return None


def _edited_paths(tool: str, arguments: dict[str, Any]) -> list[str]:
    if tool in FILE_TOOLS:
        return [input_path(arguments, tool, FILE_TOOLS[tool])]
    paths = patch_paths(_command_text(arguments))
    if not paths:
        raise MalformedEvent("the patch names no file")
    return paths


def _command_text(arguments: dict[str, Any]) -> str:
    command = arguments.get("command", arguments.get("input"))
    if isinstance(command, list) and all(isinstance(part, str) for part in command):
        return "\n".join(command)
    if not isinstance(command, str):
        raise MalformedEvent("the tool input has no 'command'")
    return command


def patch_paths(patch: str) -> list[str]:
    """The files an ``apply_patch`` patch adds, updates, deletes or moves to."""
    found: dict[str, None] = {}
    for line in patch.splitlines():
        stripped = line.strip()
        for marker in PATCH_MARKERS:
            if stripped.startswith(marker):
                path = stripped[len(marker) :].strip()
                if path:
                    found[path] = None
    return list(found)


def render(action: Action, outcome: Outcome) -> dict[str, Any] | None:
    """Codex's JSON answer to ``action``; None for no answer."""
    return render_hook_output(action, outcome)
