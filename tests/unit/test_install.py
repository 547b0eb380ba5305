"""The installer merges into existing agent configuration and takes out only its own."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from fleetbus.agents import install
from fleetbus.agents.install import Places
from fleetbus.errors import BadInput

FLEETBUS = "/opt/fleet/.venv/bin/fleetbus"

FOREIGN_CLAUDE: dict[str, Any] = {
    "model": "opus",
    "permissions": {"allow": ["Bash(make test)"]},
    "hooks": {
        "PreToolUse": [
            {
                "matcher": "Bash",
                "hooks": [{"type": "command", "command": "audit-bash", "timeout": 5}],
            }
        ],
        "Stop": [{"hooks": [{"type": "command", "command": "notify-done"}]}],
    },
}


def _write(path: Path, data: Any) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(data, indent=2) + "\n"
    path.write_text(text)
    return text.encode()


def _load(path: Path) -> Any:
    return json.loads(path.read_text())


def _commands(settings: dict[str, Any], event: str) -> list[str]:
    return [
        hook["command"]
        for group in settings["hooks"].get(event, [])
        for hook in group["hooks"]
    ]


@pytest.fixture
def repo(tmp_path: Path) -> Places:
    return Places(tmp_path, user=False)


def test_claude_install_keeps_foreign_entries(repo: Places) -> None:
    """Our hooks join the foreign ones; other keys stay as they were."""
    settings_path = repo.base / ".claude" / "settings.json"
    _write(settings_path, FOREIGN_CLAUDE)

    install.install_agent("claude-code", repo, fleetbus=FLEETBUS)

    settings = _load(settings_path)
    ours = f"{FLEETBUS} hook claude-code"
    assert settings["model"] == "opus"
    assert settings["permissions"] == FOREIGN_CLAUDE["permissions"]
    assert _commands(settings, "PreToolUse") == ["audit-bash", ours, ours]
    assert _commands(settings, "Stop") == ["notify-done"]
    for event in ("PostToolUse", "SessionStart", "UserPromptSubmit", "SessionEnd"):
        assert _commands(settings, event) == [ours]
    matchers = [g.get("matcher") for g in settings["hooks"]["PreToolUse"]]
    assert matchers == ["Bash", "Edit|Write|MultiEdit|NotebookEdit", "Bash"]
    assert _load(repo.base / ".mcp.json") == {
        "mcpServers": {"fleetbus": {"command": FLEETBUS, "args": ["mcp"]}}
    }


def test_claude_settings_have_the_hook_protocol_shape(repo: Places) -> None:
    """Matchers, ``type: command``, the command and timeouts in seconds, exactly."""
    install.install_agent("claude-code", repo, fleetbus=FLEETBUS)

    def group(timeout: int, matcher: str | None = None) -> dict[str, Any]:
        hook = {"type": "command", "command": f"{FLEETBUS} hook claude-code"}
        entry = {"hooks": [{**hook, "timeout": timeout}]}
        return entry if matcher is None else {"matcher": matcher, **entry}

    assert _load(repo.base / ".claude" / "settings.json") == {
        "hooks": {
            "PreToolUse": [
                group(15, "Edit|Write|MultiEdit|NotebookEdit"),
                group(10, "Bash"),
            ],
            "PostToolUse": [group(10, "Bash")],
            "SessionStart": [group(15)],
            "UserPromptSubmit": [group(10)],
            "SessionEnd": [group(2)],
        }
    }


def test_install_twice_changes_nothing(repo: Places) -> None:
    """A second run finds every entry in place and writes no file."""
    settings_path = repo.base / ".claude" / "settings.json"
    _write(settings_path, FOREIGN_CLAUDE)
    install.install_agent("claude-code", repo, fleetbus=FLEETBUS, memory=True)
    before = {p: p.read_bytes() for p in repo.base.rglob("*") if p.is_file()}

    changes = install.install_agent("claude-code", repo, fleetbus=FLEETBUS, memory=True)

    assert {change.action for change in changes} == {"unchanged"}
    after = {p: p.read_bytes() for p in repo.base.rglob("*") if p.is_file()}
    assert after == before


def test_uninstall_restores_the_original_exactly(repo: Places) -> None:
    """Install then uninstall leaves every pre-existing file byte for byte."""
    original = _write(repo.base / ".claude" / "settings.json", FOREIGN_CLAUDE)
    servers = {"mcpServers": {"docs": {"command": "docs-server", "args": []}}}
    mcp_original = _write(repo.base / ".mcp.json", servers)
    (repo.base / "CLAUDE.md").write_text("# Project\n\nBe nice.\n")
    install.install_agent("claude-code", repo, fleetbus=FLEETBUS, memory=True)

    install.install_agent("claude-code", repo, fleetbus=FLEETBUS, uninstall=True)

    assert (repo.base / ".claude" / "settings.json").read_bytes() == original
    assert (repo.base / ".mcp.json").read_bytes() == mcp_original
    assert (repo.base / "CLAUDE.md").read_text() == "# Project\n\nBe nice.\n"


def test_uninstall_removes_files_that_only_held_our_entries(repo: Places) -> None:
    """Files the installer created and that hold nothing else go away again."""
    install.install_agent("claude-code", repo, fleetbus=FLEETBUS, memory=True)

    install.install_agent("claude-code", repo, fleetbus=FLEETBUS, uninstall=True)

    assert [p for p in repo.base.rglob("*") if p.is_file()] == []


def test_malformed_json_is_reported_and_left_untouched(repo: Places) -> None:
    """A broken settings file stops the install; no file is written at all."""
    settings_path = repo.base / ".claude" / "settings.json"
    settings_path.parent.mkdir()
    settings_path.write_text('{"hooks": {,}\n')

    with pytest.raises(BadInput, match=r"settings\.json is not valid JSON"):
        install.install_agent("claude-code", repo, fleetbus=FLEETBUS)

    assert settings_path.read_text() == '{"hooks": {,}\n'
    assert not (repo.base / ".mcp.json").exists()


def test_malformed_mcp_file_stops_before_the_hooks(repo: Places) -> None:
    """Files are all checked first: a bad .mcp.json leaves settings.json alone."""
    (repo.base / ".mcp.json").write_text("[1, 2")

    with pytest.raises(BadInput, match=r"\.mcp\.json is not valid JSON"):
        install.install_agent("claude-code", repo, fleetbus=FLEETBUS)

    assert not (repo.base / ".claude").exists()
    assert (repo.base / ".mcp.json").read_text() == "[1, 2"


def test_non_object_json_is_refused(repo: Places) -> None:
    """A settings file holding a list is not ours to reinterpret."""
    _write(repo.base / ".claude" / "settings.json", ["hooks"])

    with pytest.raises(BadInput, match="not an object"):
        install.install_agent("claude-code", repo, fleetbus=FLEETBUS)


def test_moved_installation_updates_in_place(repo: Places) -> None:
    """A new fleetbus path replaces ours instead of adding a second entry."""
    install.install_agent("claude-code", repo, fleetbus=FLEETBUS)

    install.install_agent("claude-code", repo, fleetbus="/new/bin/fleetbus")

    settings = _load(repo.base / ".claude" / "settings.json")
    assert _commands(settings, "SessionStart") == ["/new/bin/fleetbus hook claude-code"]
    servers = _load(repo.base / ".mcp.json")["mcpServers"]
    assert servers == {"fleetbus": {"command": "/new/bin/fleetbus", "args": ["mcp"]}}


def test_foreign_server_named_fleetbus_is_not_overwritten(repo: Places) -> None:
    """Another server under our name is an error, not something to replace."""
    taken = {"mcpServers": {"fleetbus": {"command": "other-tool"}}}
    original = _write(repo.base / ".mcp.json", taken)

    with pytest.raises(BadInput, match="does not run fleetbus"):
        install.install_agent("claude-code", repo, fleetbus=FLEETBUS)

    assert (repo.base / ".mcp.json").read_bytes() == original


def test_gemini_hooks_in_milliseconds_with_its_mcp_server(repo: Places) -> None:
    """Gemini gets its own events, timeouts in ms, and the server beside them."""
    original = _write(repo.base / ".gemini" / "settings.json", {"theme": "dark"})

    install.install_agent("gemini", repo, fleetbus=FLEETBUS)

    settings = _load(repo.base / ".gemini" / "settings.json")
    assert settings["theme"] == "dark"
    assert set(settings["hooks"]) == {
        "BeforeTool",
        "AfterTool",
        "BeforeAgent",
        "SessionStart",
        "SessionEnd",
    }
    after_tool = settings["hooks"]["AfterTool"][0]["matcher"]
    assert "write_file" in after_tool.split("|")
    timeouts = [
        hook["timeout"]
        for groups in settings["hooks"].values()
        for group in groups
        for hook in group["hooks"]
    ]
    assert min(timeouts) >= 1000
    assert settings["mcpServers"]["fleetbus"]["args"] == ["mcp"]

    install.install_agent("gemini", repo, fleetbus=FLEETBUS, uninstall=True)
    assert (repo.base / ".gemini" / "settings.json").read_bytes() == original


def test_codex_hooks_and_toml_server_round_trip(repo: Places) -> None:
    """Codex: hooks.json merged, config.toml gains a marked block and loses it."""
    toml_path = repo.base / ".codex" / "config.toml"
    toml_path.parent.mkdir()
    toml_text = 'model = "o4"\n\n[mcp_servers.docs]\ncommand = "docs"\n'
    toml_path.write_text(toml_text)

    install.install_agent("codex", repo, fleetbus=FLEETBUS)
    install.install_agent("codex", repo, fleetbus=FLEETBUS)

    import tomllib

    config = tomllib.loads(toml_path.read_text())
    assert config["model"] == "o4"
    assert config["mcp_servers"]["docs"] == {"command": "docs"}
    assert config["mcp_servers"]["fleetbus"] == {"command": FLEETBUS, "args": ["mcp"]}
    hooks = _load(repo.base / ".codex" / "hooks.json")
    assert _commands(hooks, "PreToolUse") == [f"{FLEETBUS} hook codex"] * 2

    install.install_agent("codex", repo, fleetbus=FLEETBUS, uninstall=True)
    assert toml_path.read_text() == toml_text
    assert not (repo.base / ".codex" / "hooks.json").exists()


def test_malformed_toml_is_reported_and_left_untouched(repo: Places) -> None:
    """A broken config.toml stops the install before anything is written."""
    toml_path = repo.base / ".codex" / "config.toml"
    toml_path.parent.mkdir()
    toml_path.write_text("model = \n")

    with pytest.raises(BadInput, match="not valid TOML"):
        install.install_agent("codex", repo, fleetbus=FLEETBUS)

    assert toml_path.read_text() == "model = \n"
    assert not (repo.base / ".codex" / "hooks.json").exists()


def test_mcp_target_writes_every_agents_server(repo: Places) -> None:
    """``install mcp`` registers the server for each agent and nothing else."""
    install.install_mcp(repo, fleetbus=FLEETBUS)

    assert "fleetbus" in _load(repo.base / ".mcp.json")["mcpServers"]
    assert "fleetbus" in _load(repo.base / ".gemini" / "settings.json")["mcpServers"]
    assert "[mcp_servers.fleetbus]" in (repo.base / ".codex/config.toml").read_text()
    assert not (repo.base / ".claude").exists()

    install.install_mcp(repo, fleetbus=FLEETBUS, uninstall=True)
    assert [p for p in repo.base.rglob("*") if p.is_file()] == []


def test_user_level_targets_the_home_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--user writes ~/.claude/settings.json and leaves Claude's own MCP file."""
    monkeypatch.setenv("HOME", str(tmp_path))

    install.install_agent(
        "claude-code", install.places(None, user=True), fleetbus=FLEETBUS
    )

    assert (tmp_path / ".claude" / "settings.json").exists()
    assert not (tmp_path / ".mcp.json").exists()
    assert not (tmp_path / ".claude.json").exists()


def test_memory_snippet_is_appended_between_markers(repo: Places) -> None:
    """The snippet tells the model how to publish a fact and wait for a claim."""
    memory = repo.base / "AGENTS.md"
    memory.write_text("# Agents\n")

    install.install_agent("codex", repo, fleetbus=FLEETBUS, memory=True)

    text = memory.read_text()
    assert text.startswith("# Agents\n\n" + install.MEMORY_BEGIN)
    assert text.rstrip().endswith(install.MEMORY_END)
    assert "fleetbus fact" in text
    assert "fleetbus claim --wait" in text


def test_each_changed_file_is_reported_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Gemini's hooks and MCP server share a file: one line says it was written."""
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)

    install.run("gemini", repo=str(tmp_path))

    lines = capsys.readouterr().out.splitlines()
    assert lines == [f"written: {tmp_path.resolve() / '.gemini' / 'settings.json'}"]


def test_cli_prints_the_snippet_and_installs(tmp_path: Path) -> None:
    """``fleetbus install`` runs from the command line, in a git worktree."""
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    cli = [install.fleetbus_executable()]
    snippet = subprocess.run(
        [*cli, "install", "claude-code", "--print-snippet"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert snippet.stdout == install.SNIPPET

    done = subprocess.run(
        [*cli, "install", "claude-code", "--repo", str(tmp_path / ".")],
        capture_output=True,
        text=True,
        check=False,
    )

    assert done.returncode == 0, done.stderr
    settings = _load(tmp_path / ".claude" / "settings.json")
    command = _commands(settings, "SessionStart")[0]
    assert command.endswith("/fleetbus hook claude-code")
    assert Path(command.split()[0]).is_absolute()
