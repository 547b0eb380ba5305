"""Gemini CLI's side of ``fleetbus hook gemini``.

Events: ``BeforeTool`` and ``AfterTool`` on ``write_file`` and ``replace``
(``tool_input.file_path``) and on ``run_shell_command``, ``BeforeAgent`` (a
prompt was submitted), ``SessionStart`` and ``SessionEnd``. The session id is
``GEMINI_SESSION_ID``, else the event's ``session_id``.

A refusal is ``{"decision": "deny", "reason": ...}``; the reason reaches the
model as the tool's error. ``BeforeTool`` cannot add context to an allowed
call, so the facts on an edited file come with ``AfterTool`` instead, as
``hookSpecificOutput.additionalContext``. A warning for the user goes to
``systemMessage``. Gemini CLI wants JSON on stdout, so "nothing to say" is
``{}``.
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

AGENT = "gemini"
SESSION_ENV = "GEMINI_SESSION_ID"
EDIT_TOOLS = frozenset({"write_file", "replace"})
SHELL_TOOLS = frozenset({"run_shell_command"})
_LIFECYCLE = {"SessionStart": "start", "BeforeAgent": "prompt", "SessionEnd": "end"}
_CONTEXT_EVENTS = frozenset({"AfterTool", "SessionStart", "BeforeAgent"})
NO_ANSWER: dict[str, Any] = {}
"""Gemini CLI reads stdout as JSON, so "nothing to say" is an empty object."""


def parse(event: dict[str, Any], env: Mapping[str, str]) -> Action | None:
    """The action a Gemini CLI hook event asks for, if any."""
    name = text_field(event, "hook_event_name")
    cwd = event_cwd(event)
    session_id = env.get(SESSION_ENV) or event.get("session_id")
    if not isinstance(session_id, str) or not session_id:
        raise MalformedEvent(f"no {SESSION_ENV} and no 'session_id' in the event")
    base = Action("none", AGENT, name, session_id, cwd)
    if name in _LIFECYCLE:
        return base.but(_LIFECYCLE[name])
    if name not in ("BeforeTool", "AfterTool"):
        return None
    tool = text_field(event, "tool_name")
    before = name == "BeforeTool"
    if tool in EDIT_TOOLS:
        path = input_path(tool_input(event), tool, "file_path")
        kind = "edit" if before else "edited"
        paths = (absolute(path, cwd),)
        return base.but(kind, paths=paths, facts=not before)
    if tool in SHELL_TOOLS:
        command = input_command(tool_input(event), tool)
        return base.but("bash" if before else "bashed", command=command)
    return None


def render(action: Action, outcome: Outcome) -> dict[str, Any] | None:
    """Gemini CLI's JSON answer to ``action``."""
    answer: dict[str, Any] = {}
    if outcome.deny is not None:
        answer["decision"] = "deny"
        answer["reason"] = outcome.deny
    if outcome.context and action.event in _CONTEXT_EVENTS:
        answer["hookSpecificOutput"] = {
            "hookEventName": action.event,
            "additionalContext": outcome.context,
        }
    if outcome.warning:
        answer["systemMessage"] = outcome.warning
    return answer
