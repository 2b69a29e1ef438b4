"""The planning wizard driven through Pilot: walk it for every method, save profiles the CLI
accepts, launch a tiny CPU run, block Next on bad input, keep opened profiles byte for byte,
refresh the memory table within 100 ms of a key press; snapshots of every step."""

from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path

import pytest
import yaml
from textual import events

from engine.planner import Hardware
from engine.profile import load_profile
from tests.conftest import PROFILES, TINY_LLAMA, zerotune
from tui.app import ZerotuneApp
from tui.widgets.wizard_field import Field

GiB = 2**30
# A fixed machine for the estimates: no GPU, 16 GiB of RAM (snapshots must not depend on the
# machine the tests run on).
CPU_16G = Hardware(gpus_per_node=0, gpu_mem_bytes=0, host_mem_bytes=16 * GiB)
TINY_CONFIG = yaml.safe_dump(TINY_LLAMA, default_flow_style=True, width=10_000).strip()
DATA = {"cpt": "owasp-text.jsonl", "sft": "owasp-sft.jsonl", "dpo": "owasp-dpo.jsonl"}
STEP_IDS = ["data", "model", "method", "memory", "inference", "training", "review"]


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    """A workspace holding the shipped profiles and their data (a fixed folder name, so the
    data tree looks the same in every snapshot)."""
    ws = tmp_path / "ws"
    (ws / "profiles" / "data").mkdir(parents=True)
    for f in (PROFILES / "data").glob("*.jsonl"):
        shutil.copy(f, ws / "profiles" / "data" / f.name)
    for f in PROFILES.glob("*.yaml"):
        shutil.copy(f, ws / "profiles" / f.name)
    return ws


def make_app(workspace: Path, hardware: Hardware = CPU_16G) -> ZerotuneApp:
    return ZerotuneApp(workspace, hardware=hardware, blink_cursor=False, poll_interval=0.5)


def busy(app: ZerotuneApp) -> bool:
    """A worker of ours runs (the directory tree's loader lives forever), or a typed data
    path waits for the typing to pause."""
    if [w for w in app.workers if w.group != "_loader" and not w.is_finished]:
        return True
    wizard = app.wizard
    if wizard is None or not wizard.is_mounted:
        return False
    data = wizard.step("data")
    return data._preview_timer is not None or data._reveal_timer is not None


async def settle(pilot, timeout: float = 60.0) -> None:
    """Wait until the app has nothing of ours in flight."""
    app = pilot.app
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not busy(app):
            await pilot.pause()
            if not busy(app):
                break
        await asyncio.sleep(0.02)
    else:
        raise AssertionError("workers still running")
    await pilot.pause()


def field(app: ZerotuneApp, path: str) -> Field:
    step = app.wizard.current_step
    found = [f for f in step.query(Field) if f.path == path]
    assert found, f"no field {path} on step {step.step_id}"
    return found[0]


async def fill(pilot, path: str, text: str) -> Field:
    """Type into a field of the current step, replacing what it shows."""
    f = field(pilot.app, path)
    f.focus_control()
    await pilot.pause()
    await pilot.press("home", "ctrl+k", *text)
    await settle(pilot)
    return f


async def paste(pilot, path: str, text: str) -> Field:
    """Paste into a field of the current step, replacing what it shows."""
    f = field(pilot.app, path)
    f.focus_control()
    await pilot.pause()
    await pilot.press("home", "ctrl+k")
    f.control_widget.post_message(events.Paste(text))
    await settle(pilot)
    return f


async def next_step(pilot, expect: str) -> None:
    await pilot.press("ctrl+n")
    await settle(pilot)
    w = pilot.app.wizard
    problems = [f"{p.path}: {p.message}" for p in w.current_step.problems]
    assert w.current_step.step_id == expect, problems


async def walk_new_profile(pilot, method: str, name: str, *, max_steps: int = 4) -> Path:
    """From the home screen to a saved profile, through every step, keyboard first."""
    app = pilot.app
    await pilot.press("n")
    await settle(pilot)
    w = app.wizard
    assert w.current_step.step_id == "data"
    # Data: a shipped file typed in; the method follows the detected shape.
    await fill(pilot, "data.train", f"data/{DATA[method]}")
    await fill(pilot, "data.max_seq_len", "64")
    step = w.current_step
    assert step.preview is not None and step.preview.error is None
    assert step.report is not None and step.report.report.rows_read > 0, step.report.error
    assert w.draft.value("method.kind") == method
    await next_step(pilot, "model")
    # Model: a tiny Llama from scratch.
    await pilot.click("#src-scratch")
    await settle(pilot)
    await paste(pilot, "model.config", TINY_CONFIG)
    await fill(pilot, "model.tokenizer_vocab_size", "320")
    assert w.shape is not None and w.shape.num_layers == 2, w.shape_error
    await next_step(pilot, "method")
    await pilot.click(f"#kind-{method}")
    await settle(pilot)
    await next_step(pilot, "memory")
    # Memory: micro-batch 2 and ZeRO-2 without offload, picked in the table with Enter.
    await fill(pilot, "training.micro_batch_size", "2")
    mem = w.current_step
    assert mem.plan is not None, mem.plan_error
    table = mem.query_one("#mem-table")
    row = [(r.zero_stage, r.offload_optimizer, r.offload_param) for r in mem._rows].index(
        (2, "none", "none"))
    table.focus()
    table.move_cursor(row=row)
    await pilot.press("enter")
    await settle(pilot)
    assert w.draft.value("deepspeed.zero_stage") == 2
    await next_step(pilot, "inference")
    await next_step(pilot, "training")
    await fill(pilot, "training.max_steps", str(max_steps))
    await fill(pilot, "training.lr", "1e-3")
    await fill(pilot, "training.warmup_ratio", "0")
    await fill(pilot, "training.eval_every", "2")
    await fill(pilot, "training.save_every", str(max_steps))
    await fill(pilot, "training.eval_max_rows", "8")
    await next_step(pilot, "review")
    await fill(pilot, "name", name)
    return app.workspace / "profiles" / f"{name}.yaml"


# --------------------------------------------------------------------------------------------
# Walking the wizard
# --------------------------------------------------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize("method", ["cpt", "sft", "dpo"])
async def test_walk_wizard_and_save(workspace: Path, method: str) -> None:
    app = make_app(workspace)
    async with app.run_test(size=(80, 24)) as pilot:
        path = await walk_new_profile(pilot, method, f"walk-{method}")
        await pilot.press("ctrl+s")
        await settle(pilot)
        assert path.exists(), app.wizard.current_step.problems
    lp = load_profile(path)
    p = lp.profile
    assert p.method.kind == method
    assert p.model.init == "scratch" and p.model.config == TINY_LLAMA
    assert p.model.tokenizer_vocab_size == 320
    assert p.training.micro_batch_size == 2 and p.training.max_steps == 4
    assert p.training.lr == 1e-3 and p.deepspeed.zero_stage == 2
    assert p.data.max_seq_len == 64
    # Only what was answered is written: defaults stay out of the file.
    raw = yaml.safe_load(path.read_text())
    assert "inference" not in raw and "resources" not in raw
    out = zerotune("profile", "validate", str(path))
    assert out.returncode == 0, out.stderr


@pytest.mark.asyncio
async def test_save_and_launch_runs_to_completion(workspace: Path) -> None:
    from engine.history import get_run, open_db
    from engine.workspace import db_path

    app = make_app(workspace)
    async with app.run_test(size=(80, 24)) as pilot:
        path = await walk_new_profile(pilot, "sft", "launch-sft", max_steps=4)
        await pilot.press("ctrl+r")
        review = app.wizard.step("review")
        deadline = time.monotonic() + 60
        while review.last_run_id is None and time.monotonic() < deadline:
            assert "Not launched" not in str(review.query_one("#review-status").render())
            await asyncio.sleep(0.1)
        run_id = review.last_run_id
        assert run_id, str(review.query_one("#review-status").render())
        assert path.exists()
        await pilot.pause()
        try:
            from tui.screens.monitor import MonitorScreen
        except ImportError:
            MonitorScreen = None  # the monitor is built beside the wizard
        if MonitorScreen is not None:
            assert isinstance(app.screen, MonitorScreen)
        status = None
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline:
            if db_path(workspace).exists():
                db = open_db(db_path(workspace))
                try:
                    status = get_run(db, run_id)["status"]
                except LookupError:
                    status = None
                finally:
                    db.close()
                if status in ("completed", "failed", "stopped", "lost"):
                    break
            await asyncio.sleep(1.0)
        assert status == "completed", (status, (workspace / "runs" / run_id / "engine.log")
                                       .read_text()[-3000:])
        # Home lists it among the recent runs.
        app.action_home()
        await settle(pilot)
        home = app.screen
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            recent = home.query_one("#home-recent")
            if run_id in [k.value for k in recent.rows]:
                break
            await asyncio.sleep(0.1)
        row = recent.get_row(run_id)
        assert "launch-sft" in str(row[1]) and "completed" in str(row[3])


@pytest.mark.asyncio
async def test_command_palette_reaches_the_actions(workspace: Path) -> None:
    app = make_app(workspace)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        titles = {c.title for c in app.get_system_commands(app.screen)}
        assert {"New run", "Open profile", "History", "Home", "Open profile demo-sft"} <= titles
        await pilot.press("ctrl+p")
        await pilot.pause()
        await pilot.press(*"Open profile demo-sft")
        await pilot.pause(0.5)
        await pilot.press("enter")
        await settle(pilot)
        assert app.wizard is not None and app.screen is app.wizard
        assert app.wizard.draft.name == "demo-sft"
        titles = {c.title for c in app.get_system_commands(app.screen)}
        assert {"Next step", "Previous step", "Save profile", "Save & launch",
                "Go to step 4: Memory", "Use the recommended ZeRO option"} <= titles
        await pilot.press("ctrl+p")
        await pilot.pause()
        await pilot.press(*"Go to step 4")
        await pilot.pause(0.5)
        await pilot.press("enter")
        await settle(pilot)
        assert app.wizard.current_step.step_id == "memory"
        await pilot.press("escape")
        await settle(pilot)
        assert app.screen.id == "home"


@pytest.mark.asyncio
async def test_open_profile_from_home_prefills_every_step(workspace: Path) -> None:
    app = make_app(workspace)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("o")
        await pilot.pause()
        names = [o.id for o in app.screen.query_one("#open-list").options]
        index = names.index(str(workspace / "profiles" / "demo-lora.yaml"))
        for _ in range(index):
            await pilot.press("down")
        await pilot.press("enter")
        await settle(pilot)
        w = app.wizard
        assert w.draft.source == (workspace / "profiles" / "demo-lora.yaml").resolve()
        assert field(app, "data.train").control_widget.value == "data/owasp-sft.jsonl"
        assert field(app, "data.validation_split").control_widget.value == "0.05"
        w.show_step(1)
        await settle(pilot)
        assert field(app, "model.tokenizer_vocab_size").control_widget.value == "4096"
        assert w.step("model")._kind == "scratch"
        w.show_step(2)
        await settle(pilot)
        assert field(app, "method.lora.r").control_widget.value == "16"
        assert field(app, "method.merge_adapter").control_widget.value is True
        w.show_step(3)
        await settle(pilot)
        mem = w.current_step
        assert mem.current_option() == (2, "cpu", "none")
        assert field(app, "training.micro_batch_size").control_widget.value == "8"
        w.show_step(5)
        await settle(pilot)
        assert field(app, "training.max_steps").control_widget.value == "60"
        assert field(app, "training.lr").control_widget.value == "0.002"
        w.show_step(6)
        await settle(pilot)
        assert field(app, "name").control_widget.value == "demo-lora"


@pytest.mark.asyncio
@pytest.mark.parametrize("name", sorted(p.stem for p in PROFILES.glob("*.yaml")))
async def test_unchanged_profile_saves_the_same_bytes(workspace: Path, name: str) -> None:
    path = workspace / "profiles" / f"{name}.yaml"
    before = path.read_bytes()
    app = make_app(workspace)
    async with app.run_test(size=(80, 24)) as pilot:
        assert app.open_profile_in_wizard(path)
        await settle(pilot)
        for i in range(7):  # visit every step: showing a value must not change it
            app.wizard.show_step(i)
            await settle(pilot)
        assert not app.wizard.draft.changed, app.wizard.draft.data
        await pilot.press("ctrl+s")
        await settle(pilot)
        assert "Saved" in str(app.wizard.step("review").query_one("#review-status").render())
    assert path.read_bytes() == before


@pytest.mark.asyncio
async def test_edited_profile_keeps_everything_else(workspace: Path) -> None:
    path = workspace / "profiles" / "demo-dpo.yaml"
    before = load_profile(path).profile
    app = make_app(workspace)
    async with app.run_test(size=(80, 24)) as pilot:
        app.open_profile_in_wizard(path)
        await settle(pilot)
        app.wizard.show_step(5)
        await settle(pilot)
        assert before.training.lr != 2e-4  # the edit must be a change
        await fill(pilot, "training.lr", "2e-4")
        assert app.wizard.draft.changed
        await pilot.press("ctrl+s")
        await settle(pilot)
    after = load_profile(path).profile
    assert after.training.lr == 2e-4
    assert after.model_copy(update={"training": before.training}) == before
    assert after.training.model_copy(update={"lr": before.training.lr}) == before.training


@pytest.mark.asyncio
async def test_frozen_run_profile_opens_and_saves_over_the_original(workspace: Path) -> None:
    """What the history's "edit" does: a run's frozen profile (absolute paths, every default
    spelled out) opened in the wizard and saved to profiles/, asking before overwriting."""
    from engine.profile import resolved_paths

    frozen = workspace / "runs" / "0123456789ab" / "profile.yaml"
    frozen.parent.mkdir(parents=True)
    frozen.write_text(resolved_paths(load_profile(workspace / "profiles" / "demo-sft.yaml"))
                      .to_yaml())
    app = make_app(workspace)
    async with app.run_test(size=(80, 24)) as pilot:
        assert app.open_profile_in_wizard(frozen)
        await settle(pilot)
        w = app.wizard
        for step in STEP_IDS[1:-1]:
            await next_step(pilot, step)
        await fill(pilot, "training.max_steps", "7")
        await next_step(pilot, "review")
        await pilot.press("ctrl+s")
        await settle(pilot)
        from tui.widgets.common_confirm import ConfirmScreen

        assert isinstance(app.screen, ConfirmScreen)
        await pilot.press("y")
        await settle(pilot)
        assert w.draft.source == (workspace / "profiles" / "demo-sft.yaml").resolve()
    saved = load_profile(workspace / "profiles" / "demo-sft.yaml").profile
    assert saved.training.max_steps == 7
    assert saved.data.train == str(workspace / "profiles" / "data" / "owasp-sft.jsonl")


# --------------------------------------------------------------------------------------------
# Bad input: an inline message, Next blocked, nothing crashes
# --------------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_missing_data_file_blocks_next(workspace: Path) -> None:
    app = make_app(workspace)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("n")
        await settle(pilot)
        await pilot.press("ctrl+n")
        await settle(pilot)
        f = field(app, "data.train")
        assert app.wizard.current_step.step_id == "data"
        assert f.error and "required" in f.error
        await fill(pilot, "data.train", "data/nope.jsonl")
        assert "file not found" in (f.error or "")
        await pilot.press("ctrl+n")
        await settle(pilot)
        assert app.wizard.current_step.step_id == "data"
        assert app.focused is f.control_widget


@pytest.mark.asyncio
async def test_data_without_the_methods_columns_blocks_next(workspace: Path) -> None:
    app = make_app(workspace)
    async with app.run_test(size=(80, 24)) as pilot:
        app.open_profile_in_wizard(workspace / "profiles" / "demo-sft.yaml")
        await settle(pilot)
        # The profile says sft on prompt_completion data; give it raw text instead.
        await fill(pilot, "data.train", "data/owasp-text.jsonl")
        await pilot.press("ctrl+n")
        await settle(pilot)
        w = app.wizard
        assert w.current_step.step_id == "data"
        messages = " ".join(p.message for p in w.current_step.problems)
        assert "sft" in messages and "text" in messages, messages
        assert "step 3" in messages
        # Mapping the columns (prompt <- source, completion <- text) satisfies the shape.
        from textual.widgets import Select

        for need, have in (("prompt", "source"), ("completion", "text")):
            sel = w.current_step.query_one(f"#map-{need}", Select)
            sel.value = have
            await settle(pilot)
        assert w.draft.get("data.columns") == {"prompt": "source", "completion": "text"}
        await next_step(pilot, "model")


@pytest.mark.asyncio
async def test_method_that_does_not_fit_the_data_blocks_next(workspace: Path) -> None:
    app = make_app(workspace)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("n")
        await settle(pilot)
        w = app.wizard
        await fill(pilot, "data.train", "data/owasp-text.jsonl")
        assert w.draft.value("method.kind") == "cpt"  # followed the data
        w.action_goto(2)
        await settle(pilot)
        await pilot.click("#kind-sft")
        await settle(pilot)
        await pilot.press("ctrl+n")
        await settle(pilot)
        assert w.current_step.step_id == "method"
        box = str(w.current_step.query_one("#step-problems").render())
        assert "sft needs" in box and "text" in box, box
        await pilot.click("#kind-cpt")
        await settle(pilot)
        await next_step(pilot, "memory")


@pytest.mark.asyncio
@pytest.mark.parametrize("path, text, message", [
    ("training.lr", "abc", "expected a number"),
    ("training.max_steps", "1.5", "whole number"),
    ("training.warmup_ratio", "2", "less than 1"),
    ("training.eval_every", "0", "greater than or equal to 1"),
])
async def test_bad_training_values_show_inline_and_block_next(
        workspace: Path, path: str, text: str, message: str) -> None:
    app = make_app(workspace)
    async with app.run_test(size=(80, 24)) as pilot:
        app.open_profile_in_wizard(workspace / "profiles" / "demo.yaml")
        await settle(pilot)
        app.wizard.show_step(5)
        await settle(pilot)
        f = await fill(pilot, path, text)
        assert f.error and message in f.error, f.error
        assert f.has_class("-invalid")
        await pilot.press("ctrl+n")
        await settle(pilot)
        assert app.wizard.current_step.step_id == "training"
        assert not app.wizard.draft.validate()[0]
        # Fixing the value clears the message and Next goes on.
        await fill(pilot, path, "4" if path != "training.warmup_ratio" else "0.1")
        assert f.error is None
        await next_step(pilot, "review")


@pytest.mark.asyncio
async def test_bad_memory_values_block_next(workspace: Path) -> None:
    app = make_app(workspace)
    async with app.run_test(size=(80, 24)) as pilot:
        app.open_profile_in_wizard(workspace / "profiles" / "demo.yaml")
        await settle(pilot)
        app.wizard.show_step(3)
        await settle(pilot)
        f = await fill(pilot, "training.micro_batch_size", "0")
        assert f.error and "greater than or equal to 1" in f.error
        mem = app.wizard.current_step
        assert mem.plan is None  # no estimate for an invalid setup, and no crash
        g = await fill(pilot, "resources.num_nodes", "two")
        assert g.error and "whole number" in g.error
        await pilot.press("ctrl+n")
        await settle(pilot)
        assert app.wizard.current_step.step_id == "memory"


@pytest.mark.asyncio
async def test_bad_model_config_blocks_next(workspace: Path) -> None:
    app = make_app(workspace)
    async with app.run_test(size=(80, 24)) as pilot:
        app.open_profile_in_wizard(workspace / "profiles" / "demo.yaml")
        await settle(pilot)
        app.wizard.show_step(1)
        await settle(pilot)
        f = await fill(pilot, "model.config", "{hidden_size: 32}")
        await pilot.press("ctrl+n")
        await settle(pilot)
        assert app.wizard.current_step.step_id == "model"
        assert f.error and "model_type" in f.error
        f = await fill(pilot, "model.tokenizer_vocab_size", "ten")
        assert f.error and "whole number" in f.error


# --------------------------------------------------------------------------------------------
# The memory table follows the keyboard
# --------------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_micro_batch_key_press_updates_the_table_within_100ms(workspace: Path) -> None:
    profile = workspace / "profiles" / "qwen-plan.yaml"
    profile.write_text(yaml.safe_dump({
        "name": "qwen-plan",
        "model": {"path": "Qwen/Qwen2.5-0.5B"},  # a catalog model: the shape is known offline
        "data": {"train": "data/owasp-sft.jsonl", "max_seq_len": 2048},
        "method": {"kind": "sft"},
        "training": {"micro_batch_size": 1},
        "resources": {"gpus_per_node": 1, "gpu_memory_gb": 24, "host_memory_gb": 64},
    }, sort_keys=False))
    app = make_app(workspace)
    async with app.run_test(size=(120, 40)) as pilot:
        app.open_profile_in_wizard(profile)
        await settle(pilot)
        app.wizard.show_step(3)
        await settle(pilot)
        mem = app.wizard.current_step
        assert mem.plan is not None, mem.plan_error
        assert mem.plan.hardware.device == "gpu"
        table = mem.query_one("#mem-table")

        def per_gpu() -> list[str]:
            return [str(table.get_row_at(i)[3]) for i in range(table.row_count)]

        before = per_gpu()
        f = field(app, "training.micro_batch_size")
        f.focus_control()
        await pilot.press("end")
        await settle(pilot)
        latencies = []
        for key in ("2", "backspace", "8"):  # 12, 1, 18
            count = mem.refresh_count
            t0 = time.perf_counter()
            await pilot.press(key)
            while mem.refresh_count == count and time.perf_counter() - t0 < 2:
                await asyncio.sleep(0.001)
            latencies.append(mem.last_refresh_at - t0)
        await settle(pilot)
        assert app.wizard.draft.value("training.micro_batch_size") == 18
        assert per_gpu() != before
        print(f"estimate refresh after a key press: {[round(x * 1000, 1) for x in latencies]} ms")
        assert max(latencies) < 0.100, latencies


# --------------------------------------------------------------------------------------------
# Snapshots of every step
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(80, 24), (120, 40)], ids=["80x24", "120x40"])
@pytest.mark.parametrize("step", STEP_IDS)
def test_snapshot_step(workspace: Path, snap_compare, step: str, size: tuple[int, int]) -> None:
    app = make_app(workspace)

    async def run_before(pilot) -> None:
        app.open_profile_in_wizard(workspace / "profiles" / "demo-lora.yaml")
        await settle(pilot)
        app.wizard.show_step(STEP_IDS.index(step))
        await settle(pilot)
        await pilot.pause(0.1)
        await settle(pilot)

    assert snap_compare(app, terminal_size=size, run_before=run_before)
