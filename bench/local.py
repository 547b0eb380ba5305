"""In-process figures: the replica's "may I edit?" and the broker's decision.

Both run the pure code (``ClaimView``, ``ClaimTable``) with a populated table,
timing each call with ``perf_counter_ns`` (whose own cost, about 0.1 µs, is
included in every figure). The local scenario also times the pure part of a
join: building the compact snapshot, and decoding and loading it.
"""

from __future__ import annotations

import gc
import random
import statistics
import time
from collections.abc import Callable
from typing import Any

import orjson

from bench.context import Run
from bench.harness import cpus, pinned
from bench.stats import quantile
from fleetbus.claims import ClaimTable, ClaimView, Now, SessionInfo
from fleetbus.scope import parse_scope
from fleetbus.sequence import Sequence

SIZES_QUICK = [10, 1_000, 10_000, 100_000]
SIZES_FULL = [10, 100, 1_000, 10_000, 100_000]
SESSIONS = 50


def scope_text(i: int) -> str:
    """The ``i``-th scope of a synthetic fleet: mostly files, some dirs and globs."""
    package = f"pkg{i % 200}"
    if i % 50 == 0:
        return f"{package}/dir{i}/"
    if i % 50 == 1:
        return f"{package}/gen{i}/*.py"
    return f"{package}/mod{i // 200}/f{i}.py"


def snapshot(count: int, sessions: int = SESSIONS) -> dict[str, Any]:
    """A snapshot of ``count`` claims held by ``sessions`` sessions."""
    now = time.time()
    rows = []
    for i in range(count):
        sid = f"s{i % sessions}"
        rows.append(
            {
                "id": f"c{i}",
                "sid": sid,
                "name": sid,
                "scope": parse_scope(scope_text(i)).text,
                "mode": "exclusive",
                "intent": "",
                "grant": f"g{i}",
                "fence": i + 1,
                "since": now,
                "expires": None,
            }
        )
    infos = [
        SessionInfo(f"s{n}", f"s{n}", {}, True, 5.0, now, now).to_wire()
        for n in range(sessions)
    ]
    return {"head": count, "sessions": infos, "claims": rows, "waiters": []}


def probe_paths(count: int, n: int = 2000) -> list[str]:
    """Paths to ask about: half held by someone, half free, in the same trees."""
    rng = random.Random(7)
    paths = []
    for k in range(n):
        i = rng.randrange(count)
        if k % 2:
            text = scope_text(i)
            paths.append(text.replace("*", "x") + ("a.py" if text[-1] == "/" else ""))
        else:
            paths.append(f"pkg{i % 200}/mod{i // 200}/free{k}.py")
    return paths


def _time_calls(call: Callable[[str], object], paths: list[str]) -> list[float]:
    clock = time.perf_counter_ns
    out = []
    for path in paths:
        began = clock()
        call(path)
        out.append((clock() - began) / 1000)
    return out


def run(ctx: Run) -> None:
    """``ClaimView.may_edit`` with 10 to 100,000 claims held."""
    sizes = SIZES_QUICK if ctx.quick else SIZES_FULL
    views: dict[int, tuple[ClaimView, list[str]]] = {}
    for size in sizes:
        view = ClaimView()
        view.load(snapshot(size))
        views[size] = (view, probe_paths(size))
    gc.collect()
    per_size: dict[int, list[float]] = {size: [] for size in sizes}
    with pinned({cpus()[-1]}):
        for _ in range(ctx.reps * ctx.scale(2, 3)):
            for size, (view, paths) in views.items():
                times = _time_calls(lambda p, v=view: v.may_edit(p, "me"), paths)
                per_size[size].append(quantile(times, 0.5))
    for size, p50s in per_size.items():
        name = f"local_check_p50_us_{_label(size)}"
        ctx.report.add(name, p50s, "us")
        ctx.report.note(
            name,
            f"ClaimView.may_edit, {size} claims held, 2,000 paths (half held), "
            "pinned to one CPU",
        )
    ctx.report.ratio("local_check_flatness", per_size[sizes[-1]], per_size[sizes[0]])
    ctx.report.note(
        "local_check_flatness",
        f"p50 with {sizes[-1]:,} claims over p50 with {sizes[0]}",
    )
    _join_parts(ctx, 10_000)


def _join_parts(ctx: Run, count: int) -> None:
    """The pure part of a join with ``count`` claims, without the network."""
    table, _ = _table(count)
    build: list[float] = []
    load: list[float] = []
    for _ in range(ctx.reps * 3):
        gc.collect()
        began = time.perf_counter()
        body = orjson.dumps(table.view.snapshot(compact=True))
        built = time.perf_counter()
        ClaimView().load(orjson.loads(body))
        done = time.perf_counter()
        build.append((built - began) * 1000)
        load.append((done - built) * 1000)
    label = _label(count)
    for name, times, what in (
        (f"snapshot_build_ms_{label}", build, "the compact snapshot built and encoded"),
        (f"replica_load_ms_{label}", load, "the compact snapshot decoded and loaded"),
    ):
        ctx.report.add(name, [statistics.median(times)], "ms")
        ctx.report.note(
            name,
            f"{what} of {count:,} claims in grants of 64, in process, encoded "
            "with orjson; unpinned",
        )


def _label(size: int) -> str:
    return f"{size // 1000}k" if size >= 1000 else str(size)


def _table(count: int) -> tuple[ClaimTable, Now]:
    """A table holding ``count`` claims in grants of up to 64 scopes."""
    table = ClaimTable("bench:decision", Sequence())
    now = Now(wall=time.time(), mono=time.monotonic())
    for n in range(SESSIONS + 1):
        table.join(f"s{n}", f"s{n}", {}, leased=True, lease_s=3600.0, now=now)
    for start in range(0, count, 64):
        scopes = [
            parse_scope(scope_text(i)) for i in range(start, min(count, start + 64))
        ]
        table.claim(
            f"s{(start // 64) % SESSIONS}",
            scopes,
            mode="exclusive",
            intent="",
            ttl_s=None,
            wait_s=None,
            rid=f"r{start}",
            now=now,
        )
    return table, now


def run_decision(ctx: Run) -> None:
    """``ClaimTable.claim`` of one free file with 10 and 100,000 claims held."""
    sizes = [10, 100_000] if ctx.quick else [10, 10_000, 100_000]
    tables = {size: _table(size) for size in sizes}
    rounds = ctx.scale(2000, 5000)
    per_size: dict[int, list[float]] = {size: [] for size in sizes}
    counter = iter(range(10**9))
    with pinned({cpus()[-1]}):
        for _ in range(ctx.reps * 2):
            for size, (table, now) in tables.items():
                per_size[size].append(_decisions(table, now, rounds, counter))
    for size, p50s in per_size.items():
        name = f"decision_p50_us_{_label(size)}"
        ctx.report.add(name, p50s, "us")
        ctx.report.note(
            name,
            f"ClaimTable.claim of one free file, {size:,} claims held "
            "(decision, events and replica apply; no I/O)",
        )
    ctx.report.ratio("decision_ratio", per_size[sizes[-1]], per_size[sizes[0]])
    _queue_figures(ctx, 1_000)


def _queue_figures(ctx: Run, waiting: int) -> None:
    """One file, one holder and ``waiting`` sessions queued for it: a wait
    more queued (and cancelled), and a release handing the file on."""
    queue: list[float] = []
    hand_on: list[float] = []
    for _ in range(ctx.reps):
        table, now = _queued_table(waiting)
        scope = [parse_scope("package.json")]
        clock = time.perf_counter_ns
        times = []
        for n in range(50):
            began = clock()
            table.claim(
                "late",
                scope,
                mode="exclusive",
                intent="",
                ttl_s=None,
                wait_s=600.0,
                rid=f"late{n}",
                now=now,
            )
            times.append((clock() - began) / 1000)
            table.cancel("late", f"late{n}", now=now)
        queue.append(quantile(times, 0.5))
        times = []
        holder, grant = "w0", table.view.claims("w0")[0].grant
        for n in range(1, 51):
            began = clock()
            out = table.release(holder, grant=grant, now=now)
            times.append((clock() - began) / 1000)
            holder = f"w{n}"
            grant = next(r for s, _, r in out.deferred if s == holder)["grant"]
        hand_on.append(quantile(times, 0.5))
    label = _label(waiting)
    for name, values, what in (
        (f"wait_queue_p50_us_{label}", queue, "a wait queued behind them"),
        (f"wait_hand_on_p50_us_{label}", hand_on, "a release granting the next"),
    ):
        ctx.report.add(name, values, "us")
        ctx.report.note(
            name,
            f"{what}: ClaimTable, one file held and {waiting:,} sessions waiting "
            "for it, deadlock check and queue order included; no I/O",
        )


def _queued_table(waiting: int) -> tuple[ClaimTable, Now]:
    """A table whose ``w0`` holds one file that ``w1`` … ``wN`` wait for."""
    table = ClaimTable("bench:queue", Sequence())
    now = Now(wall=time.time(), mono=time.monotonic())
    for n in range(waiting + 1):
        table.join(f"w{n}", f"w{n}", {}, leased=True, lease_s=3600.0, now=now)
    table.join("late", "late", {}, leased=True, lease_s=3600.0, now=now)
    scope = [parse_scope("package.json")]
    for n in range(waiting + 1):
        table.claim(
            f"w{n}",
            scope,
            mode="exclusive",
            intent="",
            ttl_s=None,
            wait_s=600.0 if n else None,
            rid=f"q{n}",
            now=now,
        )
    return table, now


def _decisions(table: ClaimTable, now: Now, rounds: int, counter: Any) -> float:
    clock = time.perf_counter_ns
    times = []
    sid = f"s{SESSIONS}"
    for _ in range(rounds):
        n = next(counter)
        scope = parse_scope(f"pkg{n % 200}/mod{n % 500}/new{n}.py")
        began = clock()
        out = table.claim(
            sid,
            [scope],
            mode="exclusive",
            intent="",
            ttl_s=None,
            wait_s=None,
            rid=f"d{n}",
            now=now,
        )
        times.append((clock() - began) / 1000)
        assert out.reply is not None
        table.release(sid, grant=out.reply["grant"], now=now)
    return quantile(times, 0.5)
