"""The TUI's run screens: history browser, live monitor, run detail and compare.

Pilot tests drive the screens in a minimal app (and once through the real ``ZerotuneApp``);
a live test watches, stops and re-finds a real tiny CPU run. Snapshot tests render every screen
at 80x24 and 120x40 from a fixed fixture database written through the supervisor's own
recorder, with "now" frozen and the clock in UTC.
"""

from __future__ import annotations

import asyncio
import json
import math
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from textual.app import App
from textual.screen import Screen
from textual.widgets import DataTable, Input, Select

from engine import history
from engine.workspace import db_path
from tests.conftest import REPO, tiny_profile, zerotune
from tui.screens.compare import CompareScreen
from tui.screens.history import HistoryScreen
from tui.widgets.run_table import RunTable
from tui.screens.monitor import MonitorScreen
from tui.screens.run_detail import RunDetailScreen, last_traceback
from tui.widgets.run_confirm import ConfirmRunAction

# --------------------------------------------------------------------------------------------
# The fixture workspace: fixed ids, times and contents

T0 = 1_790_000_000.0  # 2026-09-21 14:13:20 UTC
NOW = T0 + 6 * 3600.0
HOST = "fixture-host"  # not this machine: reconciliation leaves the "running" run alone


def _profile(name: str, kind: str = "sft", lr: float = 2e-4, r: int = 16,
             adapter: str = "lora", stage: int = 2, steps: int = 40) -> dict[str, Any]:
    return {
        "name": name, "seed": 42,
        "model": {"path": "qwen2.5-0.5b", "dtype": "bf16"},
        "data": {"train": "data/owasp-sft.jsonl", "format": "prompt_completion",
                 "validation_split": 0.1, "max_seq_len": 512},
        "method": {"kind": kind, "adapter": adapter, "lora": {"r": r, "alpha": 2 * r}},
        "training": {"max_steps": steps, "micro_batch_size": 4, "grad_accum": 2, "lr": lr,
                     "scheduler": "cosine", "eval_every": 10, "save_every": 20},
        "deepspeed": {"zero_stage": stage, "offload_optimizer": "none"},
    }


ENGINE_LOG_OK = """\
[2026-09-21 12:53:25,101] [INFO] [launch.py:256:main] process 4242 spawned
[zerotune] loading data: 1,080 rows, 108 for evaluation
[zerotune] model: qwen2.5-0.5b, LoRA r=16 (1,081,344 trainable parameters)
{'loss': '2.914', 'grad_norm': '1.52', 'learning_rate': '0.0002', 'epoch': '0.25'}
{'eval_loss': '2.611', 'eval_runtime': '3.02'}
Saving checkpoint-20
{'loss': '1.733', 'grad_norm': '0.97', 'learning_rate': '0.00011', 'epoch': '0.5'}
"""

ENGINE_LOG_FAILED = """\
[2026-09-21 13:23:25,101] [INFO] [launch.py:256:main] process 4343 spawned
[zerotune] loading data: 540 preference pairs
Traceback (most recent call last):
  File "/opt/zerotune/engine/train.py", line 444, in main
    return _run(p, run_dir, ds_config, device, dtype, events, resume_from)
  File "/opt/zerotune/engine/train.py", line 512, in _run
    trainer.train()
RuntimeError: DefaultCPUAllocator: can't allocate memory: you tried to allocate 8589934592 bytes
[2026-09-21 13:24:01,555] [ERROR] [launch.py:325:sigkill_handler] exits with return code = 1
"""


def _loss(step: int, scale: float = 1.0) -> float:
    return 0.6 + 2.4 * scale * math.exp(-step / 14.0) + 0.04 * math.sin(step * 1.7)


def _write_run(ws: Path, db: history.HistoryDB, rid: str, *, name: str, created: float,
               profile: dict[str, Any], steps_done: int, total: int, status: str,
               step_s: float = 3.0, scale: float = 1.0, reason: str | None = None,
               exit_code: int | None = 0, log: str = ENGINE_LOG_OK,
               error: dict[str, Any] | None = None, est_host: int | None = 2 * 1024**3,
               last_event_at: float | None = None) -> None:
    run_dir = ws / "runs" / rid
    run_dir.mkdir(parents=True)
    (run_dir / "profile.yaml").write_text(yaml.safe_dump(profile, sort_keys=False))
    ds = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2,
          "zero_optimization": {"stage": profile["deepspeed"]["zero_stage"]},
          "bf16": {"enabled": True}}
    (run_dir / "ds_config.json").write_text(json.dumps(ds, indent=2) + "\n")
    argv = ["deepspeed", "--num_gpus", "1", "--module", "engine.train", "--run-dir",
            f"runs/{rid}"]
    (run_dir / "command.txt").write_text("DS_ACCELERATOR=cpu " + " ".join(argv) + "\n")
    (run_dir / "launch.json").write_text(json.dumps(
        {"run_id": rid, "argv": argv, "env": {"DS_ACCELERATOR": "cpu"}, "cwd": "/srv/zerotune",
         "resume_from": None}, indent=2))
    (run_dir / "environment.json").write_text(json.dumps({
        "versions": {"python": "3.11.7", "torch": "2.5.1+cpu", "deepspeed": "0.16.2",
                     "transformers": "4.46.3", "zerotune": "0.1.0"},
        "host": HOST, "user": "ada", "platform": "Linux-6.1-x86_64", "cpu_count": 2,
        "gpus": [], "placement": {"device": "cpu", "gpus_per_node": 1, "num_nodes": 1},
        "data_files": {"data/owasp-sft.jsonl": "3d70ef6f49a8fa0f" * 4},
        "data_fingerprint": "bd00242d39421f32",
    }, indent=2))
    (run_dir / "engine.log").write_text(log)
    started = created + 5.0
    rec = history.RunRecorder(db, rid)
    rec.update(name=name, status="running", method=profile["method"]["kind"],
               adapter=profile["method"]["adapter"], zero_stage=profile["deepspeed"]["zero_stage"],
               model=profile["model"]["path"], world_size=1, run_dir=str(run_dir.resolve()),
               host=HOST, created_at=created, started_at=started, total_steps=total,
               profile_hash=rid[::-1], sample_interval=2.0, est_peak_host_bytes=est_host,
               supervisor_pid=None)
    events: list[dict[str, Any]] = [{"event": "start", "t": started,
                                     "method": profile["method"]["kind"],
                                     "adapter": profile["method"]["adapter"],
                                     "world_size": 1, "num_params": 494_032_768,
                                     "total_steps": total}]
    lr0 = profile["training"]["lr"]
    for s in range(1, steps_done + 1):
        t = started + s * step_s
        events.append({"event": "step", "t": t, "step": s, "total_steps": total,
                       "loss": _loss(s, scale), "lr": lr0 * 0.5 * (1 + math.cos(math.pi * s / total)),
                       "tokens_per_s": 900.0 + 40 * math.sin(s), "elapsed": s * step_s})
        if s % 10 == 0:
            events.append({"event": "eval", "t": t + 0.5, "step": s,
                           "eval_loss": _loss(s, scale) + 0.15, "perplexity": math.exp(_loss(s, scale) + 0.15)})
        if s % 20 == 0:
            events.append({"event": "checkpoint", "t": t + 1.0, "step": s,
                           "path": str(run_dir / "checkpoints" / f"checkpoint-{s}")})
        if s == 3:
            events.append({"event": "warning", "t": t + 0.2,
                           "message": "12 of 1080 training rows were longer than max_seq_len"})
    if error:
        events.append({"event": "error", "t": started + steps_done * step_s + 1, **error})
    if status == "stopped":
        events.append({"event": "stopped", "t": started + steps_done * step_s + 2,
                       "step": steps_done, "checkpoint": str(run_dir / "checkpoints" /
                                                             f"checkpoint-{steps_done}")})
    if status == "completed":
        events.append({"event": "done", "t": started + steps_done * step_s + 3,
                       "summary": {"steps": steps_done, "final_loss": _loss(steps_done, scale),
                                   "tokens_per_s": 912.5, "wall_time": steps_done * step_s + 3}})
    if last_event_at is not None:
        for ev in events:  # shift so that the newest event is at last_event_at
            ev["t"] += last_event_at - events[-1]["t"]
    rec.add_events(events)
    t_end = events[-1]["t"]
    n = int((t_end - started) // 2) + 1
    rec.add_samples([{"t": started + 2 * k, "device": "host", "kind": "host",
                      "util": 150.0 + 40 * math.sin(k / 3), "mem_used": 9 * 1024**3,
                      "mem_total": 16 * 1024**3, "proc_mem": int(1.2 * 1024**3 + k * 2**22),
                      "proc_mem_peak": int(1.25 * 1024**3 + k * 2**22)} for k in range(n)])
    if status != "running":
        rec.finish(status, exit_code=exit_code, reason=reason, ended_at=t_end + 1.0)
    assert rec.flush()


def build_fixture_workspace(ws: Path) -> dict[str, str]:
    """Six runs, one of each status, deterministic to the byte; returns {role: run id}."""
    ids = {"a": "a1c0ffee0001", "b": "a1c0ffee0002", "failed": "b2d0decaf003",
           "stopped": "c3e0beef0004", "lost": "d4f0cafe0005", "running": "e5a0face0006"}
    db = history.open_db(db_path(ws))
    try:
        _write_run(ws, db, ids["a"], name="security-sft", created=T0,
                   profile=_profile("security-sft"), steps_done=40, total=40, status="completed")
        _write_run(ws, db, ids["b"], name="security-sft-lr3", created=T0 + 600,
                   profile=_profile("security-sft-lr3", lr=3e-4, r=32), steps_done=40,
                   total=40, status="completed", scale=0.8, step_s=2.5)
        _write_run(ws, db, ids["failed"], name="legal-dpo", created=T0 + 1800,
                   profile=_profile("legal-dpo", kind="dpo", adapter="none", stage=3),
                   steps_done=12, total=60, status="failed", exit_code=1,
                   reason="out of host memory", log=ENGINE_LOG_FAILED,
                   error={"kind": "host_oom", "reason": "DefaultCPUAllocator: can't allocate "
                                                        "memory", "step": 12})
        _write_run(ws, db, ids["stopped"], name="chat-cpt", created=T0 + 3600,
                   profile=_profile("chat-cpt", kind="cpt", adapter="none", stage=1),
                   steps_done=25, total=100, status="stopped", exit_code=0,
                   reason="stopped by request (checkpoint saved)")
        _write_run(ws, db, ids["lost"], name="code-sft", created=T0 + 4000,
                   profile=_profile("code-sft"), steps_done=8, total=40, status="lost",
                   exit_code=None,
                   reason="the supervisor and the engine are gone without recording an end")
        _write_run(ws, db, ids["running"], name="owasp-cpt", created=NOW - 300,
                   profile=_profile("owasp-cpt", kind="cpt", steps=200), steps_done=60,
                   total=200, status="running", exit_code=None, last_event_at=NOW - 3.0)
    finally:
        db.close()
    return ids


@pytest.fixture
def fixture_ws(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    ws = tmp_path / "ws"
    return ws, build_fixture_workspace(ws)


@pytest.fixture
def utc(monkeypatch):
    """Local time is UTC while the test runs (start times and event times are shown local)."""
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


# --------------------------------------------------------------------------------------------
# A minimal app that shows one of the run screens


class RunsTestApp(App):
    """Pushes the screen ``make_screen`` builds; records profiles opened in the wizard."""

    def __init__(self, make_screen: Callable[[], Screen]):
        super().__init__()
        self.make_screen = make_screen
        self.opened_profiles: list[Path] = []

    def on_mount(self) -> None:
        self.push_screen(self.make_screen())

    def open_profile_in_wizard(self, path: Path) -> bool:
        self.opened_profiles.append(Path(path))
        return True


async def wait_for(pilot, condition: Callable[[], Any], timeout: float = 10.0,
                   what: str = "condition") -> Any:
    """Let the app run until ``condition()`` is truthy (workers finish, polls arrive)."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        await pilot.pause(0.05)


def table_rows(table: DataTable | RunTable) -> list[list[str]]:
    if isinstance(table, RunTable):
        return [table.get_row(i) for i in range(table.row_count)]
    return [[str(getattr(c, "plain", c)) for c in table.get_row_at(i)]
            for i in range(table.row_count)]


def history_names(screen: HistoryScreen) -> list[str]:
    return [r["name"] for r in screen.page.rows] if screen.page else []


# --------------------------------------------------------------------------------------------
# The query behind the browser


def test_page_runs_filters_sorts_and_pages(fixture_ws):
    ws, ids = fixture_ws
    db = history.open_db(db_path(ws))
    try:
        rows, total = history.page_runs(db, now=NOW)
        assert total == 6 and [r["id"] for r in rows][:2] == [ids["running"], ids["lost"]]
        rows, total = history.page_runs(db, text="SECURITY sft", now=NOW)
        assert total == 2 and {r["name"] for r in rows} == {"security-sft", "security-sft-lr3"}
        rows, total = history.page_runs(db, status="failed", now=NOW)
        assert [r["id"] for r in rows] == [ids["failed"]] and rows[0]["reason"]
        rows, _ = history.page_runs(db, sort="best_eval_loss", descending=False, now=NOW)
        bests = [r["best_eval_loss"] for r in rows]
        known = [b for b in bests if b is not None]
        assert known == sorted(known) and bests[len(known):] == [None] * (6 - len(known))
        # Empty values sort last in both directions.
        rows, _ = history.page_runs(db, sort="best_eval_loss", descending=True, now=NOW)
        assert rows[-1]["best_eval_loss"] is None or all(r["best_eval_loss"] for r in rows)
        rows, total = history.page_runs(db, sort="name", descending=False, limit=2, offset=2,
                                        now=NOW)
        assert total == 6 and [r["name"] for r in rows] == ["legal-dpo", "owasp-cpt"]
        # The running run turns stalled when "now" is far past its last event.
        rows, _ = history.page_runs(db, status="stalled", now=NOW + 3600, stall_minutes=10)
        assert [r["id"] for r in rows] == [ids["running"]]
        assert rows[0]["recorded_status"] == "running" and rows[0]["status"] == "stalled"
        run = next(r for r in history.page_runs(db, now=NOW)[0] if r["id"] == ids["a"])
        assert run["peak_mem_kind"] == "host" and run["peak_mem_bytes"] > 1024**3
        assert run["duration_s"] == pytest.approx(123.0)
        with pytest.raises(history.HistoryError):
            history.page_runs(db, sort="nope")
    finally:
        db.close()


def test_last_traceback_takes_the_last_one_to_its_exception_line():
    log = "x\nTraceback (most recent call last):\n  a\nValueError: old\n" + ENGINE_LOG_FAILED
    tb = last_traceback(log)
    assert tb.startswith("Traceback") and tb.endswith("8589934592 bytes")
    assert "old" not in tb and "sigkill_handler" not in tb


# --------------------------------------------------------------------------------------------
# Pilot tests on the fixture workspace


@pytest.mark.asyncio
async def test_history_filters_as_you_type_and_by_status(fixture_ws):
    ws, _ = fixture_ws
    app = RunsTestApp(lambda: HistoryScreen(ws, clock=lambda: NOW))
    async with app.run_test(size=(120, 30)) as pilot:
        screen = await wait_for(pilot, lambda: isinstance(app.screen, HistoryScreen)
                                and app.screen.loads and app.screen, what="history")
        table = screen.query_one(RunTable)
        assert table.row_count == 6
        assert history_names(screen)[0] == "owasp-cpt"  # newest first
        await pilot.press("slash")
        assert isinstance(app.focused, Input)
        await pilot.press(*"secu")
        await wait_for(pilot, lambda: screen.page.query.text == "secu", what="filter")
        assert sorted(history_names(screen)) == ["security-sft", "security-sft-lr3"]
        assert table.row_count == 2
        await pilot.press(*" lr3")
        await wait_for(pilot, lambda: screen.page.query.text == "secu lr3")
        assert history_names(screen) == ["security-sft-lr3"]
        # Clear the text, filter by status through the select.
        screen.query_one(Input).value = ""
        await wait_for(pilot, lambda: screen.page.query.text == "")
        screen.query_one(Select).value = "failed"
        await wait_for(pilot, lambda: screen.page.query.status == "failed")
        assert history_names(screen) == ["legal-dpo"]
        assert "failed" in table_rows(table)[0][1]
        await pilot.press("escape")  # leaves the filter for the table
        assert isinstance(app.focused, RunTable)
        await pilot.press("t")  # next status in the cycle after failed: stopped
        await wait_for(pilot, lambda: screen.page.query.status == "stopped")
        assert history_names(screen) == ["chat-cpt"]


@pytest.mark.asyncio
async def test_history_sorts_by_any_column(fixture_ws):
    ws, _ = fixture_ws
    app = RunsTestApp(lambda: HistoryScreen(ws, clock=lambda: NOW))
    async with app.run_test(size=(160, 30)) as pilot:
        screen = await wait_for(pilot, lambda: isinstance(app.screen, HistoryScreen)
                                and app.screen.loads and app.screen)
        await pilot.press("s")  # from STARTED (the default) to the next column: ID
        await wait_for(pilot, lambda: screen.page.query.sort == "id")
        assert [r["id"] for r in screen.page.rows] == sorted(r["id"] for r in screen.page.rows)
        # Clicking a header sorts by it; clicking again reverses.
        table = screen.query_one(RunTable)
        await pilot.click(table, offset=(20, 0))  # the NAME header

        await wait_for(pilot, lambda: screen.page.query.sort == "name")
        names = history_names(screen)
        assert names == sorted(names)
        await pilot.press("S")
        await wait_for(pilot, lambda: screen.page.query.descending)
        assert history_names(screen) == sorted(names, reverse=True)


@pytest.mark.asyncio
async def test_history_pages_past_the_last_row(fixture_ws):
    ws, _ = fixture_ws
    app = RunsTestApp(lambda: HistoryScreen(ws, clock=lambda: NOW, page_size=4))
    async with app.run_test(size=(120, 30)) as pilot:
        screen = await wait_for(pilot, lambda: isinstance(app.screen, HistoryScreen)
                                and app.screen.loads and app.screen)
        assert len(screen.page.rows) == 4 and screen.page.total == 6
        first = history_names(screen)
        await pilot.press("down", "down", "down", "down")  # past the 4th row: the next page
        await wait_for(pilot, lambda: screen.page.query.offset == 4)
        assert len(screen.page.rows) == 2 and not set(first) & set(history_names(screen))
        await pilot.press("up")  # before the first row: back, cursor on the last row
        await wait_for(pilot, lambda: screen.page.query.offset == 0)
        assert screen.query_one(RunTable).cursor_row == 3


@pytest.mark.asyncio
async def test_compare_two_marked_runs_shows_the_changed_keys(fixture_ws):
    ws, ids = fixture_ws
    app = RunsTestApp(lambda: HistoryScreen(ws, clock=lambda: NOW))
    async with app.run_test(size=(120, 40)) as pilot:
        screen = await wait_for(pilot, lambda: isinstance(app.screen, HistoryScreen)
                                and app.screen.loads and app.screen)
        await pilot.press("slash", *"security", "enter")
        await wait_for(pilot, lambda: screen.page.query.text == "security")
        await pilot.press("space", "space")  # mark both (the cursor moves down on marking)
        assert set(screen.marked) == {ids["a"], ids["b"]}
        await pilot.press("c")
        compare = await wait_for(pilot, lambda: isinstance(app.screen, CompareScreen)
                                 and app.screen.loads and app.screen, what="compare")
        c = compare.comparison
        assert c is not None
        assert set(c.changed_keys) == {"name", "training.lr", "method.lora.r",
                                       "method.lora.alpha"}
        diff = table_rows(compare.query_one("#compare-diff", DataTable))
        assert [row[0] for row in diff] == sorted(c.changed_keys)
        lr = next(row for row in diff if row[0] == "training.lr")
        assert set(lr[1:]) == {"0.0002", "0.0003"}
        # All keys: the equal ones are listed too.
        await pilot.press("a")
        assert len(compare.query_one("#compare-diff", DataTable).rows) == len(c.profile) > len(diff)
        results = {row[0]: row[1:] for row in
                   table_rows(compare.query_one("#compare-results", DataTable))}
        assert results["status"] == ["completed", "completed"]
        assert "loss (last)" in results
        # Marked in table order (newest first): the lr3 run is the first column.
        # The ids share 11 characters: labels show as many as it takes to tell them apart.
        assert [s.label for s in compare.query_one("#compare-loss").series] == \
            [f"security-sft-lr3 {ids['b']}", f"security-sft {ids['a']}"]


@pytest.mark.asyncio
async def test_detail_of_a_failed_run_shows_the_reason_then_the_traceback(fixture_ws, utc):
    ws, ids = fixture_ws
    app = RunsTestApp(lambda: RunDetailScreen(ws, ids["failed"], clock=lambda: NOW))
    async with app.run_test(size=(120, 40)) as pilot:
        screen = await wait_for(pilot, lambda: isinstance(app.screen, RunDetailScreen)
                                and app.screen.loads and app.screen)
        reason = str(screen.query_one("#detail-reason").render())
        assert reason.startswith("failed: out of host memory")
        assert "host_oom" in reason
        tb = screen.detail.traceback
        assert tb.startswith("Traceback") and "DefaultCPUAllocator" in tb
        # The reason comes first, the traceback below it, then the summary.
        ys = [screen.query_one(f"#detail-{n}").region.y for n in ("reason", "traceback",
                                                                   "summary")]
        assert ys == sorted(ys) and len(set(ys)) == 3
        assert screen.detail.files["profile.yaml"].startswith("name: legal-dpo")


@pytest.mark.asyncio
async def test_delete_from_history_keeps_the_directory_unless_asked(fixture_ws):
    ws, ids = fixture_ws
    app = RunsTestApp(lambda: HistoryScreen(ws, clock=lambda: NOW))
    async with app.run_test(size=(120, 30)) as pilot:
        screen = await wait_for(pilot, lambda: isinstance(app.screen, HistoryScreen)
                                and app.screen.loads and app.screen)
        screen.query_one(Select).value = "lost"
        await wait_for(pilot, lambda: screen.page.query.status == "lost")
        await pilot.press("x")
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmRunAction))
        await pilot.press("n")  # cancelled: nothing happens
        await wait_for(pilot, lambda: app.screen is screen)
        assert history_names(screen) == ["code-sft"]
        await pilot.press("x")
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmRunAction))
        await pilot.press("y")
        await wait_for(pilot, lambda: screen.page.total == 0, what="deleted")
        assert (ws / "runs" / ids["lost"]).is_dir()
        # Now with the directory: the stopped run.
        screen.query_one(Select).value = "stopped"
        await wait_for(pilot, lambda: screen.page.query.status == "stopped"
                       and screen.page.total == 1)
        await pilot.press("x")
        confirm = await wait_for(pilot, lambda: isinstance(app.screen, ConfirmRunAction)
                                 and app.screen)
        confirm.query_one("#confirm-option").value = True
        await pilot.press("y")
        await wait_for(pilot, lambda: screen.page.total == 0, what="deleted with dir")
        assert not (ws / "runs" / ids["stopped"]).exists()
        # A running run cannot be deleted.
        screen.query_one(Select).value = "running"
        await wait_for(pilot, lambda: screen.page.query.status == "running"
                       and screen.page.total == 1)
        await pilot.press("x")
        await pilot.pause(0.1)
        assert app.screen is screen


@pytest.mark.asyncio
async def test_edit_opens_the_frozen_profile_in_the_wizard(fixture_ws):
    ws, ids = fixture_ws
    app = RunsTestApp(lambda: HistoryScreen(ws, clock=lambda: NOW))
    async with app.run_test(size=(120, 30)) as pilot:
        await wait_for(pilot, lambda: isinstance(app.screen, HistoryScreen) and app.screen.loads)
        await pilot.press("e")
        assert app.opened_profiles == [ws.resolve() / "runs" / ids["running"] / "profile.yaml"]


@pytest.mark.asyncio
async def test_monitor_shows_a_recorded_run(fixture_ws, utc):
    ws, ids = fixture_ws
    app = RunsTestApp(lambda: MonitorScreen(ws, ids["running"], clock=lambda: NOW,
                                            reconcile=False))
    async with app.run_test(size=(120, 40)) as pilot:
        screen = await wait_for(pilot, lambda: isinstance(app.screen, MonitorScreen)
                                and app.screen.polls and app.screen)
        assert screen.run["last_step"] == 60 and screen.run["total_steps"] == 200
        assert [s for s, _ in screen.series["loss"]] == list(range(1, 61))
        assert len(screen.series["eval_loss"]) == 6
        step = str(screen.query_one("#mon-step").render())
        eta = str(screen.query_one("#mon-eta").render())
        assert step == "step 60/200" and eta.startswith("ETA 7:00")  # 140 steps x 3 s
        kinds = [row[2] for row in table_rows(screen.query_one("#mon-events", DataTable))]
        assert kinds[:3] == ["start", "warning", "eval"] and "checkpoint" in kinds
        log = screen.query_one("#mon-log")
        assert log.line_count >= 7 and "Saving checkpoint-20" in log.lines
        # Copy the run directory path.
        await pilot.press("y")
        assert app.clipboard == str((ws / "runs" / ids["running"]).resolve())
        # Stop asks first; cancelling does nothing.
        await pilot.press("s")
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmRunAction))
        await pilot.press("escape")
        await wait_for(pilot, lambda: app.screen is screen)


@pytest.mark.asyncio
async def test_rerun_that_cannot_start_says_why(fixture_ws):
    ws, _ = fixture_ws
    app = RunsTestApp(lambda: HistoryScreen(ws, clock=lambda: NOW))
    async with app.run_test(size=(120, 30)) as pilot:
        screen = await wait_for(pilot, lambda: isinstance(app.screen, HistoryScreen)
                                and app.screen.loads and app.screen)
        screen.query_one(Select).value = "failed"
        await wait_for(pilot, lambda: screen.page.query.status == "failed")
        await pilot.press("r")
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmRunAction))
        await pilot.press("y")
        # The fixture's frozen profile names data that is not there: the runner refuses it
        # (as `zerotune runs rerun` would) and the TUI says why.
        note = await wait_for(pilot, lambda: [n for n in app._notifications
                                              if "cannot re-run" in n.message], timeout=60)
        assert note[0].severity == "error", note[0].message
        assert "data.train: file not found" in note[0].message
        assert app.screen is screen and screen.page.total == 1


def test_run_screens_import_without_the_training_stack():
    code = ("import sys\n"
            "import tui.screens.history, tui.screens.monitor, tui.screens.run_detail\n"
            "import tui.screens.compare\n"
            "heavy = {'torch', 'deepspeed', 'transformers', 'trl', 'datasets', 'sqlite_utils'}\n"
            "print(sorted(heavy & set(sys.modules)))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=REPO, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_device_gauges_show_each_gpu_or_cpu_and_ram():
    from tui.widgets.run_gauges import DeviceGauges

    gib = 1024**3
    gauges = DeviceGauges(cpu_count=8)
    gauges.samples = [
        {"device": "gpu0", "kind": "gpu", "util": 93.0, "mem_used": 70 * gib,
         "mem_total": 80 * gib, "power_w": 412.0},
        {"device": "gpu1", "kind": "gpu", "util": None, "mem_used": None, "mem_total": None,
         "power_w": None},
    ]
    text = gauges.render().plain.splitlines()
    assert len(text) == 4 and text[0].startswith("gpu0") and "93%" in text[0]
    assert "412W" in text[0] and "70.0G/80.0G" in text[1]
    assert "N/A" in text[2]  # unsupported metrics are N/A, not a crash
    gauges.samples = [{"device": "host", "kind": "host", "util": 350.0, "mem_used": 9 * gib,
                       "mem_total": 16 * gib, "proc_mem": 2 * gib}]
    text = gauges.render().plain.splitlines()
    assert text[0].startswith("CPU") and "350%/800%" in text[0]
    assert "9.0G/16.0G" in text[1] and "run 2.0G" in text[2]


# --------------------------------------------------------------------------------------------
# Through the real app


@pytest.mark.asyncio
async def test_history_mode_of_the_app(fixture_ws):
    from tui.app import ZerotuneApp

    ws, ids = fixture_ws
    app = ZerotuneApp(ws, blink_cursor=False)
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.pause()
        app.action_history()
        screen = await wait_for(pilot, lambda: isinstance(app.screen, HistoryScreen)
                                and app.screen.loads and app.screen, what="runs mode")
        assert screen.page.total == 6
        await pilot.press("d")  # detail of the run under the cursor (the newest)
        detail = await wait_for(pilot, lambda: isinstance(app.screen, RunDetailScreen)
                                and app.screen.loads and app.screen)
        assert detail.run_id == ids["running"]
        await pilot.press("escape")
        await wait_for(pilot, lambda: app.screen is screen)


# --------------------------------------------------------------------------------------------
# A real run: watch it, quit, reopen, stop it


def _runs(ws: Path) -> list[dict[str, Any]]:
    db = history.open_db(db_path(ws))
    try:
        return history.list_runs(db)
    finally:
        db.close()


@pytest.mark.asyncio
async def test_live_run_monitor_quit_reopen_and_stop(tmp_path: Path):
    ws = tmp_path / "ws"
    profile = tiny_profile(tmp_path, "cpt", name="live-cpt",
                           training={"max_steps": 5000, "eval_every": 2500, "save_every": 2500})
    r = zerotune("--workspace", str(ws), "run", str(profile), "--detach", timeout=120)
    assert r.returncode == 0, r.stderr
    run_id = r.stdout.strip().splitlines()[0]
    try:
        # 1. The history shows it; enter opens its monitor, whose steps advance.
        app = RunsTestApp(lambda: HistoryScreen(ws))
        async with app.run_test(size=(120, 40)) as pilot:
            screen = await wait_for(pilot, lambda: isinstance(app.screen, HistoryScreen)
                                    and app.screen.loads and app.screen)
            await wait_for(pilot, lambda: screen.page.rows
                           and screen.page.rows[0]["status"] in ("starting", "running"))
            await pilot.press("enter")
            monitor = await wait_for(pilot, lambda: isinstance(app.screen, MonitorScreen)
                                     and app.screen.polls and app.screen)
            monitor.poll_interval = 0.3
            first = await wait_for(pilot, lambda: (monitor.run or {}).get("last_step"),
                                   timeout=180, what="a first step")
            await wait_for(pilot, lambda: monitor.run["last_step"] > first, timeout=60,
                           what="steps to advance")
            assert monitor.run["status"] == "running"
            assert str(monitor.query_one("#mon-step").render()).startswith("step ")
            seen = monitor.run["last_step"]
        # 2. The TUI is gone; the run is not.
        await asyncio.sleep(1.0)
        run = next(x for x in _runs(ws) if x["id"] == run_id)
        assert run["status"] == "running"
        # 3. Reopen: the run is found live, its monitor goes on from where it is; stop it.
        app = RunsTestApp(lambda: HistoryScreen(ws))
        async with app.run_test(size=(120, 40)) as pilot:
            screen = await wait_for(pilot, lambda: isinstance(app.screen, HistoryScreen)
                                    and app.screen.loads and app.screen)
            assert screen.page.rows[0]["id"] == run_id
            assert screen.page.rows[0]["status"] == "running"
            await pilot.press("m")
            monitor = await wait_for(pilot, lambda: isinstance(app.screen, MonitorScreen)
                                     and app.screen.polls and app.screen)
            monitor.poll_interval = 0.3
            await wait_for(pilot, lambda: monitor.run["last_step"] > seen, timeout=60)
            await pilot.press("s")
            await wait_for(pilot, lambda: isinstance(app.screen, ConfirmRunAction))
            await pilot.press("y")
            await wait_for(pilot, lambda: app.screen is monitor)
            await wait_for(pilot, lambda: monitor.run["status"] == "stopped", timeout=120,
                           what="the run to stop")
            head = str(monitor.query_one("#mon-head").render())
            assert head.startswith("stopped")
            kinds = [row[2] for row in table_rows(monitor.query_one("#mon-events", DataTable))]
            assert "stopped" in kinds
            # 4. Resume it from the monitor: a new run from the checkpoint, in its own monitor.
            await pilot.press("u")
            await wait_for(pilot, lambda: isinstance(app.screen, ConfirmRunAction))
            await pilot.press("y")
            resumed = await wait_for(pilot, lambda: isinstance(app.screen, MonitorScreen)
                                     and app.screen is not monitor and app.screen.polls
                                     and app.screen, timeout=60, what="the resumed run")
            assert resumed.run_id != run_id
            await wait_for(pilot, lambda: (resumed.run or {}).get("parent_run_id") == run_id)
            assert resumed.run["relation"] == "resume"
    finally:
        for run in _runs(ws):
            if run["recorded_status"] in history.ACTIVE_STATUSES:
                from engine.supervisor import stop

                try:
                    stop(run, kill=True)
                except Exception:  # best-effort cleanup: the run may have just ended
                    pass


# --------------------------------------------------------------------------------------------
# Snapshots (pytest-textual-snapshot): python -m pytest tests/test_tui_runs.py --snapshot-update

SIZES = [pytest.param((80, 24), id="80x24"), pytest.param((120, 40), id="120x40")]


def _snapshot_app(ws: Path, make: Callable[[Path], Screen]) -> RunsTestApp:
    return RunsTestApp(lambda: make(ws))


async def _settled(pilot) -> None:
    screen = pilot.app.screen
    await wait_for(pilot, lambda: getattr(screen, "loads", 0) or getattr(screen, "polls", 0),
                   what="the screen's data")
    await pilot.pause(0.2)


@pytest.mark.parametrize("size", SIZES)
def test_snapshot_history(snap_compare, fixture_ws, utc, size):
    ws, _ = fixture_ws
    app = _snapshot_app(ws, lambda w: HistoryScreen(w, clock=lambda: NOW))
    assert snap_compare(app, terminal_size=size, run_before=_settled)


@pytest.mark.parametrize("size", SIZES)
def test_snapshot_monitor(snap_compare, fixture_ws, utc, size):
    ws, ids = fixture_ws
    app = _snapshot_app(ws, lambda w: MonitorScreen(w, ids["running"], clock=lambda: NOW,
                                                    reconcile=False, poll_interval=3600))
    assert snap_compare(app, terminal_size=size, run_before=_settled)


@pytest.mark.parametrize("size", SIZES)
def test_snapshot_detail_of_a_failed_run(snap_compare, fixture_ws, utc, size):
    ws, ids = fixture_ws
    app = _snapshot_app(ws, lambda w: RunDetailScreen(w, ids["failed"], clock=lambda: NOW))
    assert snap_compare(app, terminal_size=size, run_before=_settled)


@pytest.mark.parametrize("size", SIZES)
def test_snapshot_detail_curves(snap_compare, fixture_ws, utc, size):
    ws, ids = fixture_ws
    app = _snapshot_app(ws, lambda w: RunDetailScreen(w, ids["a"], clock=lambda: NOW))

    async def curves(pilot):
        await _settled(pilot)
        pilot.app.screen.query_one("#detail-tabs").active = "tab-curves"
        await pilot.pause(0.1)

    assert snap_compare(app, terminal_size=size, run_before=curves)


@pytest.mark.parametrize("size", SIZES)
def test_snapshot_compare(snap_compare, fixture_ws, utc, size):
    ws, ids = fixture_ws
    app = _snapshot_app(ws, lambda w: CompareScreen(w, [ids["a"], ids["b"]]))
    assert snap_compare(app, terminal_size=size, run_before=_settled)


@pytest.mark.parametrize("size", SIZES)
def test_snapshot_compare_curves(snap_compare, fixture_ws, utc, size):
    ws, ids = fixture_ws
    app = _snapshot_app(ws, lambda w: CompareScreen(w, [ids["a"], ids["b"], ids["stopped"]]))

    async def curves(pilot):
        await _settled(pilot)
        pilot.app.screen.query_one("#compare-tabs").active = "tab-curves"
        await pilot.pause(0.1)

    assert snap_compare(app, terminal_size=size, run_before=curves)


def test_fixture_workspace_is_deterministic(tmp_path: Path):
    """The snapshots rely on it: two builds give the same rows (ids, times, figures)."""
    def dump(ws: Path) -> list[tuple]:
        build_fixture_workspace(ws)
        db = history.open_db(db_path(ws))
        try:
            rows = history.page_runs(db, now=NOW)[0]
            return [tuple((k, v) for k, v in sorted(r.items()) if k != "run_dir") for r in rows]
        finally:
            db.close()

    assert dump(tmp_path / "one") == dump(tmp_path / "two")
