"""Reading each agent's hook events and writing its answers, without any I/O."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from fleetbus import paths
from fleetbus.agents import claude, codex, gemini, hookclient, hooks
from fleetbus.agents.hooks import Action, MalformedEvent, Outcome
from fleetbus.agents.sidecar import parse_porcelain

CWD = "/work/repo"


def event(name: str, tool: str | None = None, **tool_input: Any) -> dict[str, Any]:
    data: dict[str, Any] = {"session_id": "s1", "cwd": CWD, "hook_event_name": name}
    if tool is not None:
        data.update(tool_name=tool, tool_input=tool_input)
    return data


# -- Claude Code ----------------------------------------------------------------


@pytest.mark.parametrize("tool", ["Edit", "Write", "MultiEdit"])
def test_claude_edit_tools_become_edits_of_their_file(tool: str) -> None:
    """Edit, Write and MultiEdit name their file in file_path."""
    action = claude.parse(event("PreToolUse", tool, file_path="/work/repo/a.py"), {})

    assert action is not None
    assert (action.kind, action.paths, action.session_id) == (
        "edit",
        ("/work/repo/a.py",),
        "s1",
    )


def test_claude_notebook_edit_uses_notebook_path() -> None:
    """NotebookEdit names its file in notebook_path."""
    action = claude.parse(
        event("PreToolUse", "NotebookEdit", notebook_path="n.ipynb"), {}
    )

    assert action is not None
    assert action.paths == ("/work/repo/n.ipynb",)


def test_claude_relative_paths_are_taken_against_the_event_cwd() -> None:
    """A relative file_path is joined to the agent's cwd, not the hook's."""
    action = claude.parse(event("PreToolUse", "Write", file_path="src/x.py"), {})

    assert action is not None
    assert action.paths == ("/work/repo/src/x.py",)


@pytest.mark.parametrize(
    ("name", "kind"),
    [("SessionStart", "start"), ("UserPromptSubmit", "prompt"), ("SessionEnd", "end")],
)
def test_claude_lifecycle_events(name: str, kind: str) -> None:
    """Session start, prompt and end map to their actions."""
    action = claude.parse(event(name), {})

    assert action is not None
    assert action.kind == kind


def test_claude_bash_before_and_after() -> None:
    """Bash is a ``bash`` action before and a ``bashed`` one after."""
    before = claude.parse(event("PreToolUse", "Bash", command="make"), {})
    after = claude.parse(event("PostToolUse", "Bash", command="make"), {})

    assert before is not None
    assert after is not None
    assert (before.kind, before.command, after.kind) == ("bash", "make", "bashed")


@pytest.mark.parametrize(
    "data",
    [
        event("PreToolUse", "Read", file_path="a.py"),
        event("PostToolUse", "Edit", file_path="a.py"),
        event("Stop"),
        event("Notification"),
    ],
)
def test_claude_events_that_ask_nothing(data: dict[str, Any]) -> None:
    """Reads, post-edit events and unknown events need no answer."""
    assert claude.parse(data, {}) is None


def test_claude_session_id_falls_back_to_the_environment() -> None:
    """Without session_id in the event, CLAUDE_CODE_SESSION_ID names the session."""
    data = event("SessionStart")
    del data["session_id"]

    action = claude.parse(data, {"CLAUDE_CODE_SESSION_ID": "env-sid"})

    assert action is not None
    assert action.session_id == "env-sid"


@pytest.mark.parametrize(
    "data",
    [
        {"cwd": CWD},
        {**event("PreToolUse", "Edit"), "session_id": None},
        event("PreToolUse", "Edit", file_path=""),
        {**event("PreToolUse", "Edit"), "tool_input": "a.py"},
        event("PreToolUse", "Bash"),
    ],
)
def test_claude_malformed_events_are_refused(data: dict[str, Any]) -> None:
    """Missing or mistyped fields raise MalformedEvent."""
    with pytest.raises(MalformedEvent):
        claude.parse(data, {})


def test_claude_allowed_edit_has_no_permission_decision() -> None:
    """An allowed edit says nothing (no "allow": the user's prompts still apply)."""
    action = Action("edit", "claude-code", "PreToolUse", "s1", CWD)

    assert claude.render(action, Outcome()) is None
    answer = claude.render(action, Outcome(context="facts"))
    assert answer == {
        "hookSpecificOutput": {
            "hookEventName": "PreToolUse",
            "additionalContext": "facts",
        }
    }


def test_claude_denial_and_warning_shapes() -> None:
    """A denial is permissionDecision "deny"; a warning is systemMessage."""
    action = Action("edit", "claude-code", "PreToolUse", "s1", CWD)

    denied = claude.render(action, Outcome(deny="held"))
    warned = claude.render(action, Outcome(warning="broker down"))

    assert denied == {
        "hookSpecificOutput": {
            "hookEventName": "PreToolUse",
            "permissionDecision": "deny",
            "permissionDecisionReason": "held",
        }
    }
    assert warned == {"systemMessage": "broker down"}


# -- Codex ----------------------------------------------------------------------


def test_codex_patch_paths_cover_every_marker() -> None:
    """Add, Update, Delete and Move-to lines each name a file, once."""
    patch = "\n".join(
        [
            "*** Begin Patch",
            "*** Add File: new.py",
            "+x",
            "*** Update File: src/old.py",
            "*** Move to: src/renamed.py",
            "@@",
            "-a",
            "+b",
            "*** Delete File: gone.py",
            "*** Update File: new.py",
            "*** End Patch",
        ]
    )

    assert codex.patch_paths(patch) == [
        "new.py",
        "src/old.py",
        "src/renamed.py",
        "gone.py",
    ]


def test_codex_apply_patch_is_an_edit_of_its_files() -> None:
    """apply_patch's raw patch in tool_input.command names the edited files."""
    patch = "*** Begin Patch\n*** Update File: /abs/a.py\n*** Add File: b.py\n"
    action = codex.parse(event("PreToolUse", "apply_patch", command=patch), {})

    assert action is not None
    assert action.kind == "edit"
    assert action.paths == ("/abs/a.py", "/work/repo/b.py")


def test_codex_patch_through_the_shell_is_an_edit_too() -> None:
    """A heredoc fed to apply_patch from Bash counts as an edit of its files."""
    command = "apply_patch <<'EOF'\n*** Begin Patch\n*** Add File: c.py\n+1\nEOF\n"
    action = codex.parse(event("PreToolUse", "Bash", command=command), {})

    assert action is not None
    assert (action.kind, action.paths) == ("edit", ("/work/repo/c.py",))


def test_codex_command_lists_and_empty_patches() -> None:
    """A command given as a list is joined; a patch naming no file is malformed."""
    listed = codex.parse(event("PreToolUse", "Bash", command=["ls", "-l"]), {})

    assert listed is not None
    assert listed.command == "ls\n-l"
    with pytest.raises(MalformedEvent):
        codex.parse(event("PreToolUse", "apply_patch", command="*** Begin Patch"), {})


def test_codex_renders_like_claude_code() -> None:
    """Codex reads the same hookSpecificOutput fields."""
    action = Action("edit", "codex", "PreToolUse", "s1", CWD)

    answer = codex.render(action, Outcome(deny="held", context="facts"))

    assert answer == {
        "hookSpecificOutput": {
            "hookEventName": "PreToolUse",
            "permissionDecision": "deny",
            "permissionDecisionReason": "held",
            "additionalContext": "facts",
        }
    }


# -- Gemini CLI -----------------------------------------------------------------


def test_gemini_session_id_comes_from_the_environment_first() -> None:
    """GEMINI_SESSION_ID wins over the event's session_id."""
    data = event("BeforeTool", "write_file", file_path="a.py", content="x")

    action = gemini.parse(data, {"GEMINI_SESSION_ID": "g1"})

    assert action is not None
    assert (action.session_id, action.kind, action.facts) == ("g1", "edit", False)


def test_gemini_after_tool_brings_the_facts() -> None:
    """AfterTool on an edit tool asks for facts; BeforeAgent is the prompt."""
    after = gemini.parse(event("AfterTool", "replace", file_path="a.py"), {})
    prompt = gemini.parse(event("BeforeAgent"), {})

    assert after is not None
    assert prompt is not None
    assert (after.kind, prompt.kind) == ("edited", "prompt")


def test_gemini_answers() -> None:
    """Denial is decision/reason; context only where Gemini reads it; else {}."""
    before = Action("edit", "gemini", "BeforeTool", "g1", CWD)
    after = Action("edited", "gemini", "AfterTool", "g1", CWD)

    assert gemini.render(before, Outcome()) == {}
    assert gemini.render(before, Outcome(context="lost")) == {}
    assert gemini.render(before, Outcome(deny="held")) == {
        "decision": "deny",
        "reason": "held",
    }
    assert gemini.render(after, Outcome(context="facts")) == {
        "hookSpecificOutput": {
            "hookEventName": "AfterTool",
            "additionalContext": "facts",
        }
    }


@pytest.mark.parametrize(
    ("adapter", "name", "tool"),
    [
        (gemini, "BeforeTool", "read_file"),
        (gemini, "Notification", None),
        (claude, "PreToolUse", "Read"),
        (codex, "Stop", None),
    ],
)
def test_events_not_acted_on_get_the_agents_empty_answer(
    adapter: Any, name: str, tool: str | None
) -> None:
    """Gemini CLI wants JSON, so it gets {}; Claude Code and Codex get nothing."""
    data = event(name, tool, file_path="a.py") if tool else event(name)

    answer = hooks.respond(adapter, data, {"GEMINI_SESSION_ID": "g1"})

    assert answer == ({} if adapter is gemini else None)


# -- phrasing -------------------------------------------------------------------


def fact(kind: str, seq: int, body: str = "x") -> dict[str, Any]:
    return {
        "id": f"f{seq}",
        "seq": seq,
        "kind": kind,
        "topics": ["a.py"],
        "body": body,
        "name": "codex@main#1",
        "at": time.time() - 120,
    }


def test_facts_are_ordered_by_severity_then_newest() -> None:
    """Warnings and gotchas come before notes; newer before older."""
    text = hooks.facts_text(
        [
            fact("note", 1, "older"),
            fact("warning", 2),
            fact("note", 5, "newer"),
            fact("gotcha", 3),
        ]
    )

    kinds = [line.split("]")[0] for line in text.splitlines()[1:]]
    assert kinds == ["- [warning", "- [gotcha", "- [note", "- [note"]
    assert text.index("newer") < text.index("older")
    assert "codex@main#1" in text
    assert "2 min ago" in text


def test_facts_text_stays_under_the_cap() -> None:
    """Many long facts are cut to the cap with a count of what was left out."""
    facts = [fact("note", i, "word " * 100) for i in range(100)]

    text = hooks.facts_text(facts)

    assert len(text) <= hooks.CONTEXT_CAP
    assert text.splitlines()[-1].startswith("- and ")
    assert hooks.facts_text([]) == ""


def test_a_fact_longer_than_the_cap_is_shortened_not_dropped() -> None:
    """A 4 KiB gotcha still shows, cut short, and the facts after it too."""
    long = fact("gotcha", 2, "never " + "x" * 4090)

    text = hooks.facts_text([long, fact("note", 1, "short one")])

    assert len(text) <= hooks.CONTEXT_CAP
    assert "[gotcha] a.py: never xxx" in text
    assert "short one" in text


def test_denial_names_holder_intent_time_and_the_way_out() -> None:
    """The reason tells the model who, why, since when and what to do instead."""
    holder = {
        "sid": "s2",
        "name": "claude-code@feat#abcd1234",
        "scope": "src/",
        "mode": "exclusive",
        "intent": "rename login()",
        "since": time.time() - 300,
        "expires": None,
    }

    text = hooks.denial_text([holder], ["src/auth.py"])

    assert "claude-code@feat#abcd1234" in text
    assert "rename login()" in text
    assert "5 min ago" in text
    assert "fleetbus claim --wait 300 src/auth.py" in text


def test_fleet_summary_within_the_cap() -> None:
    """SessionStart's summary names each session and its claims, capped."""
    sessions = [
        {
            "sid": f"s{i}",
            "name": f"codex@b{i}#x",
            "meta": {"branch": f"b{i}", "host": "h"},
            "claims": [{"scope": f"f{i}.py", "intent": "work"}],
        }
        for i in range(30)
    ]
    facts = [fact("warning", i, "long " * 80) for i in range(50)]

    text = hooks.summary_text({"name": "me", "sessions": sessions, "facts": facts})

    assert "codex@b0#x [b0, h]: holds f0.py (work)" in text
    assert "and 20 more sessions" in text
    assert len(text) <= hooks.CONTEXT_CAP


# -- git commit --no-verify -----------------------------------------------------


@pytest.mark.parametrize(
    ("command", "skips"),
    [
        ("git commit --no-verify", True),
        ("git commit -n -m x", True),
        ("git commit -anm x", True),
        ("cd sub && git -c a=b commit -n", True),
        ("/usr/bin/git commit --no-verify", True),
        ("git commit -m -n", False),
        ("git commit -mn", False),
        ("git commit --message -n", False),
        ("git commit -- -n", False),
        ("git push --no-verify", False),
        ("echo git commit; ls -n", False),
        ("git commit -m 'unbalanced", False),
        ("git commit --no-verify -m 'unbalanced", True),
    ],
)
def test_skips_verify(command: str, skips: bool) -> None:
    """Only git commit with --no-verify or a -n option counts."""
    assert hooks.skips_verify(command) is skips


# -- the sidecar's helpers ------------------------------------------------------


def test_parse_porcelain_handles_renames_and_spaces() -> None:
    """-z output: renames give both paths; names keep their spaces."""
    out = b" M a.py\0R  new name.py\0old.py\0?? dir/x y.txt\0"

    assert parse_porcelain(out) == [
        (" M", "a.py"),
        ("R ", "new name.py"),
        ("R ", "old.py"),
        ("??", "dir/x y.txt"),
    ]


def test_runtime_dir_matches_the_shared_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The hook's pathlib-free runtime dir is fleetbus.paths.runtime_dir."""
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    assert hookclient.runtime_dir() == str(paths.runtime_dir())
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    assert hookclient.runtime_dir() == str(paths.runtime_dir())


def test_sidecar_files_are_private_and_named_by_hash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Socket names hash the session id; the directory is mode 0700."""
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))

    sock = hookclient.sidecar_file("../../etc/passwd", ".sock")

    assert os.path.dirname(sock) == str(tmp_path / "fleetbus")
    assert os.path.basename(sock).startswith("sc-")
    assert "passwd" not in sock
    assert (tmp_path / "fleetbus").stat().st_mode & 0o777 == 0o700
    assert hookclient.session_key("s") == hookclient.session_key("s")
    assert hookclient.session_key("s") != hookclient.session_key("t")


@pytest.mark.parametrize(
    ("argv", "agent"),
    [
        (["/usr/local/bin/claude"], True),
        (["node", "/usr/lib/node_modules/@openai/codex/bin/codex.js"], True),
        (["/opt/node/bin/node", "/x/gemini/index.js"], True),
        (["codex", "exec"], True),
        (["/bin/bash", "-c", "fleetbus hook claude-code"], False),
        (["python3", "-m", "pytest"], False),
        ([], False),
    ],
)
def test_looks_like_agent(argv: list[str], agent: bool) -> None:
    """Agents by name, or node running anything."""
    assert hookclient.looks_like_agent(argv) is agent


def test_agent_pid_from_env_or_the_shell_s_parent() -> None:
    """FLEETBUS_AGENT_PID wins; else a shell parent means its parent is the agent."""
    assert hookclient.find_agent_pid({"FLEETBUS_AGENT_PID": "4242"}) == 4242
    probe = (
        "import json, os; from fleetbus.agents import hookclient; "
        "print(json.dumps([hookclient.find_agent_pid({}), os.getppid()]))"
    )
    done = subprocess.run(
        ["sh", "-c", f'{sys.executable} -c "{probe}"; exit 0'],
        capture_output=True,
        text=True,
        check=True,
    )
    found, _shell = json.loads(done.stdout)
    ancestors = [os.getpid()]
    while (parent := hookclient.parent_of(ancestors[-1])) not in (None, 0, 1):
        ancestors.append(parent)

    assert found in ancestors
    assert hookclient.parent_of(os.getpid()) == os.getppid()
    assert hookclient.parent_of(2**22 + 12345) is None


def test_session_from_ancestry_finds_the_sidecar_of_an_ancestor_agent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sidecar whose agent is this process (or its parent) names the session."""
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    fake = subprocess.Popen(
        [
            *(sys.executable, "-c", "import sys; print(); sys.stdin.read()"),
            *("fleetbus.agents.sidecar", "--session-id", "codex-1"),
            *("--agent-pid", str(os.getpid())),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert fake.stdout is not None
        fake.stdout.readline()  # it runs: its command line is in /proc
        Path(hookclient.sidecar_file("codex-1", ".lock")).write_text(f"{fake.pid}\n")
        Path(hookclient.sidecar_file("gone", ".lock")).write_text("")

        mine = hookclient.session_from_ancestry(start=os.getpid())
        from_child = hookclient.session_from_ancestry(start=fake.pid)
        unrelated = hookclient.session_from_ancestry(start=os.getppid())
    finally:
        fake.communicate(b"")

    assert (mine, from_child, unrelated) == ("codex-1", "codex-1", None)
    assert hookclient.session_from_ancestry(start=os.getpid()) is None


# -- the hook's short way ---------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "found"),
    [
        (b'{"session_id": "3f2a-9c1e", "cwd": "/r"}', "3f2a-9c1e"),
        (b'{"cwd":"/r","session_id"\n :\t"s 1"}', "s 1"),
        (b'{"cwd": "/r"}', ""),
        (b'{"session_id": ""}', ""),
        (b'{"session_id": "s\\u0031"}', None),
        (b'{"session_id": "s\\"1"}', None),
        (b'{"session_id": null}', None),
        (b'{"session_id": 12}', None),
        ('{"session_id": "s\u00e9"}'.encode(), None),
        (b'{"session_id": "s\t1"}', None),
        (b'{"session_id": "s1', None),
        (b'{"x": "session_id"}', None),
        (b'{"x": "a \\"session_id\\": \\"s2\\""}', ""),
    ],
)
def test_session_id_read_as_plain_text(data: bytes, found: str | None) -> None:
    """The event's session_id without JSON: "" when absent, None when unsure."""
    assert hookclient.session_in(data) == found


def test_hook_session_follows_each_agent_s_order() -> None:
    """Claude Code: event, then env; Gemini CLI: env, then event; Codex: event."""
    event = b'{"session_id": "ev"}'
    bare = b'{"cwd": "/r"}'
    escaped = b'{"session_id": "e\\u0076"}'
    claude_env = {"CLAUDE_CODE_SESSION_ID": "cl"}
    gemini_env = {"GEMINI_SESSION_ID": "gm"}

    assert hookclient.hook_session("claude-code", event, claude_env) == "ev"
    assert hookclient.hook_session("claude-code", bare, claude_env) == "cl"
    assert hookclient.hook_session("claude-code", escaped, claude_env) is None
    assert hookclient.hook_session("gemini", event, gemini_env) == "gm"
    assert hookclient.hook_session("gemini", event, {}) == "ev"
    assert hookclient.hook_session("codex", event, claude_env) == "ev"
    assert hookclient.hook_session("codex", bare, claude_env) is None
    assert hookclient.hook_session("cursor", event, {}) is None


def test_hook_frames_round_trip_and_reject_other_replies() -> None:
    """A hook reply reads back; a declined, old-style or cut reply reads as None."""
    out = b'{"decision": "deny"}\n'
    reply = hookclient.hook_reply((0, out))
    request = b"fleetbus-hook/1 gemini 21 300\n"

    assert hookclient.read_hook_reply(reply) == (0, out)
    assert hookclient.read_hook_reply(hookclient.hook_reply((0, b""))) == (0, b"")
    assert hookclient.read_hook_reply(hookclient.hook_reply(None)) is None
    assert hookclient.read_hook_reply(reply[:-1]) is None
    assert hookclient.read_hook_reply(b'{"ok": false, "error": {}}\n') is None
    assert hookclient.read_hook_reply(b"") is None
    assert hookclient.read_hook_request(request) == ("gemini", 21, 300)
    assert hookclient.read_hook_request(b'{"op": "ping"}\n') is None
    assert hookclient.read_hook_env(
        b"FLEETBUS_FAIL=closed\0GEMINI_SESSION_ID=a=b\0"
    ) == {
        "FLEETBUS_FAIL": "closed",
        "GEMINI_SESSION_ID": "a=b",
    }


def test_the_sidecar_s_answer_is_what_the_hook_writes() -> None:
    """answer_text is the hook's stdout: a JSON line, or nothing at all."""
    assert hooks.answer_text(None) == ""
    assert hooks.answer_text({}) == "{}\n"
    assert hooks.answer_text({"a": "é"}) == '{"a": "\\u00e9"}\n'
