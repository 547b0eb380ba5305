"""Claude Code's side of ``fleetbus hook claude-code``.

Events: ``PreToolUse`` on ``Edit``, ``Write``, ``MultiEdit`` (``file_path``)
and ``NotebookEdit`` (``notebook_path``), ``PreToolUse`` and ``PostToolUse``
on ``Bash``, ``SessionStart``, ``UserPromptSubmit`` and ``SessionEnd``.

A refusal is ``hookSpecificOutput.permissionDecision: "deny"`` with the reason
for the model. An allowed edit gets no permission decision at all, since
"allow" would skip the user's own permission prompts. Facts and summaries go
to ``hookSpecificOutput.additionalContext``; a warning for the user goes to
``systemMessage``.
"""

from __future__ import annotations

from fleetbus.agents.hooks import (
    Action,
    MalformedEvent,
    Outcome,
    absolute,
    event_cwd,
    input_command,
    input_path,
    text_field,
    tool_input,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping
    from typing import Any

AGENT = "claude-code"
SESSION_ENV = "CLAUDE_CODE_SESSION_ID"
EDIT_TOOLS = {
    "Edit": "file_path",
    "Write": "file_path",
    "MultiEdit": "file_path",
    "NotebookEdit": "notebook_path",
}
SHELL_TOOLS = frozenset({"Bash"})
NO_ANSWER = None
"""No output at all: Claude Code then goes on as if there were no hook."""
_LIFECYCLE = {
    "SessionStart": "start",
    "UserPromptSubmit": "prompt",
    "SessionEnd": "end",
}


def parse(event: dict[str, Any], env: Mapping[str, str]) -> Action | None:
    """The action a Claude Code hook event asks for, if any."""
    name = text_field(event, "hook_event_name")
    cwd = event_cwd(event)
    session_id = _session_id(event, env)
    base = Action("none", AGENT, name, session_id, cwd)
    if name in _LIFECYCLE:
        return base.but(_LIFECYCLE[name])
    if name not in ("PreToolUse", "PostToolUse"):
        return None
    tool = text_field(event, "tool_name")
    if tool in EDIT_TOOLS and name == "PreToolUse":
        path = input_path(tool_input(event), tool, EDIT_TOOLS[tool])
        return base.but("edit", paths=(absolute(path, cwd),))
    if tool in SHELL_TOOLS:
        command = input_command(tool_input(event), tool)
        kind = "bash" if name == "PreToolUse" else "bashed"
        return base.but(kind, command=command)
    return None


def _session_id(event: Mapping[str, Any], env: Mapping[str, str]) -> str:
    value = event.get("session_id") or env.get(SESSION_ENV)
    if not isinstance(value, str) or not value:
        raise MalformedEvent(f"no 'session_id' in the event and no {SESSION_ENV}")
    return value


def render(action: Action, outcome: Outcome) -> dict[str, Any] | None:
    """Claude Code's JSON answer to ``action``; None for no answer."""
    return render_hook_output(action, outcome)


def render_hook_output(action: Action, outcome: Outcome) -> dict[str, Any] | None:
    """The ``hookSpecificOutput`` answer both Claude Code and Codex read."""
    answer: dict[str, Any] = {}
    specific: dict[str, Any] = {"hookEventName": action.event}
    if outcome.deny is not None:
        specific["permissionDecision"] = "deny"
        specific["permissionDecisionReason"] = outcome.deny
    if outcome.context:
        specific["additionalContext"] = outcome.context
    if len(specific) > 1:
        answer["hookSpecificOutput"] = specific
    if outcome.warning:
        answer["systemMessage"] = outcome.warning
    return answer or None
