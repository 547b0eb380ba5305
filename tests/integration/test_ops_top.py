"""``fleetbus top`` drawn in a real terminal: tmux runs it, we read the screen."""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fleetbus.client import Session, connect
from fleetbus.errors import FleetbusError
from tests.support.brokerproc import BrokerProcess

FLEETBUS = str(Path(sys.executable).parent / "fleetbus")
DEADLINE_S = 15.0

needs_tmux = pytest.mark.skipif(
    shutil.which("tmux") is None,
    reason="tmux is not installed (apt-get install -y tmux) and drives the board",
)


class Terminal:
    """A private tmux server with one window of a fixed size."""

    def __init__(self, socket: Path) -> None:
        self.socket = socket

    def tmux(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["tmux", "-S", str(self.socket), *args],
            capture_output=True,
            text=True,
            timeout=10,
            check=check,
        )

    def start(self, command: str, cwd: Path) -> None:
        self.tmux(
            "new-session", "-d", "-s", "board", "-x", "120", "-y", "40",
            "-c", str(cwd), command,
        )  # fmt: skip

    def screen(self) -> str:
        return self.tmux("capture-pane", "-p", "-t", "board").stdout

    def wait_for(self, predicate: Callable[[str], bool]) -> str:
        deadline = time.monotonic() + DEADLINE_S
        screen = ""
        while time.monotonic() < deadline:
            if self.alive():
                screen = self.screen()
                if predicate(screen):
                    return screen
            time.sleep(0.05)
        raise AssertionError(f"the board never showed it; last screen:\n{screen}")

    def alive(self) -> bool:
        return self.tmux("has-session", "-t", "board", check=False).returncode == 0


@pytest.fixture
def terminal(short_tmp: Path) -> Iterator[Terminal]:
    term = Terminal(short_tmp / "tmux.sock")
    yield term
    term.tmux("kill-server", check=False)


def _wait_in_background(session: Session, scope: str) -> threading.Thread:
    def wait() -> None:
        try:
            session.claim(scope, wait=30, intent="fix a typo")
        except FleetbusError:
            pass

    thread = threading.Thread(target=wait, daemon=True)
    thread.start()
    return thread


@needs_tmux
def test_board_shows_holders_waiters_facts_and_quits_on_q(
    broker: BrokerProcess, short_tmp: Path, terminal: Terminal
) -> None:
    """Holders in aligned columns, who waits behind whom, the fact; q quits."""
    with (
        connect(broker.url, repo=short_tmp, name="alice") as alice,
        connect(broker.url, repo=short_tmp, name="bob") as bob,
    ):
        alice.claim("src/auth/", intent="rework login")
        alice.publish("src/auth/", text="tokens are cached for 60s")
        waiter = _wait_in_background(bob, "src/auth/x.py")
        terminal.start(f"env NO_COLOR=1 {FLEETBUS} top --url {broker.url}", short_tmp)

        first = terminal.wait_for(lambda s: "behind alice" in s)
        with connect(broker.url, repo=short_tmp, name="carol") as carol:
            carol.claim("docs/", intent="update guides")
            live = terminal.wait_for(lambda s: "update guides" in s)
        terminal.tmux("send-keys", "-t", "board", "q")
        deadline = time.monotonic() + DEADLINE_S
        while terminal.alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        alice.release(all=True)
        waiter.join(10)

    assert "fleetbus top" in first
    assert "HOLDERS (1)" in first
    holder = next(line for line in first.splitlines() if "rework login" in line)
    assert "alice" in holder
    assert "src/auth/" in holder
    waiting = next(line for line in first.splitlines() if "behind alice" in line)
    assert "bob" in waiting
    assert "src/auth/x.py" in waiting
    assert "tokens are cached for 60s" in first
    assert "HOLDERS (2)" in live
    rows = [line for line in live.splitlines() if line.endswith(("login", "guides"))]
    assert rows[0].startswith("  alice  src/auth/"), "columns keep their spacing"
    assert rows[0].index("rework login") == rows[1].index("update guides")
    assert not terminal.alive(), "q ends the board"


def test_off_a_terminal_top_says_so_and_exits_2(broker: BrokerProcess) -> None:
    """Piped, the board is not drawn: one line on stderr, nothing on stdout."""
    done = subprocess.run(
        [FLEETBUS, "top", "--url", broker.url],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.strip().splitlines() == [
        "fleetbus: top draws on a terminal; elsewhere use fleetbus status or "
        "fleetbus tail"
    ]
