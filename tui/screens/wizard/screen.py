"""The wizard screen: one step per page (data, model, method, memory, inference, training, review),
a step indicator, Back/Next that keep every answer in one shared draft, and inline errors that
block Next. What the steps share and is slow to learn (the model's shape, this machine's
hardware) is loaded here, in workers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, ClassVar

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal
from textual.message import Message
from textual.screen import Screen
from textual.widget import Widget
from textual.widgets import Button, ContentSwitcher, Footer, Static
from textual.worker import get_current_worker

from tui.screens.wizard.base import WizardStep, show
from tui.screens.wizard.data import DataStep
from tui.screens.wizard.draft import Draft
from tui.screens.wizard.inference import InferenceStep
from tui.screens.wizard.memory import MemoryStep
from tui.screens.wizard.method import MethodStep
from tui.screens.wizard.model import ModelStep
from tui.screens.wizard.review import ReviewStep
from tui.screens.wizard.training import TrainingStep
from tui.widgets.wizard_field import Field
from tui.widgets.wizard_steps import StepIndicator

STEPS: tuple[type[WizardStep], ...] = (DataStep, ModelStep, MethodStep, MemoryStep,
                                       InferenceStep, TrainingStep, ReviewStep)


class ShapeLoaded(Message):
    def __init__(self, key: str, shape: Any, counts: Any, error: str | None) -> None:
        super().__init__()
        self.key = key
        self.shape = shape
        self.counts = counts
        self.error = error


class HardwareDetected(Message):
    def __init__(self, hardware: Any) -> None:
        super().__init__()
        self.hardware = hardware


def load_shape(model: dict[str, Any], base_dir: Path) -> tuple[Any, Any]:
    """The shape and parameter count of a profile's model section (engine.estimate)."""
    from engine.estimate import shape_from_profile
    from engine.model_shape import count_params
    from engine.profile import LoadedProfile, Profile

    profile = Profile.model_validate({"name": "draft", "model": model, "data": {"train": ""},
                                      "method": {"kind": "sft"}})
    shape = shape_from_profile(LoadedProfile(profile, None, base_dir))
    return shape, count_params(shape)


class WizardScreen(Screen):
    """Plan a run step by step; every step reads and writes ``self.draft``."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("ctrl+n", "next", "Next"),
        Binding("ctrl+b", "back", "Back"),
        Binding("ctrl+s", "save", "Save"),
        Binding("ctrl+r", "launch", "Save & launch"),
        Binding("escape", "home", "Home"),
    ]

    def __init__(self, workspace: Path, draft: Draft | None = None) -> None:
        super().__init__(id="wizard")
        self.workspace = Path(workspace)
        self.profiles_dir = self.workspace / "profiles"
        self.draft = draft or Draft.new(self.profiles_dir)
        self.index = 0
        self.shape: Any = None
        self.param_count: Any = None
        self.shape_error: str | None = None
        self.shape_pending = False
        self._shape_key: str | None = None
        self.detected_hardware: Any = None
        self.data_columns: set[str] | None = None
        self._nvme_free: dict[str, int] = {}
        try:
            import engine.planner  # noqa: F401 - pure Python; only its presence is checked

            self.estimator_available = True
        except ImportError:
            self.estimator_available = False

    # --- layout -------------------------------------------------------------------------------

    def compose(self) -> ComposeResult:
        yield StepIndicator([s.title for s in STEPS], id="wizard-steps")
        yield Static("", id="wizard-title")
        with ContentSwitcher(initial=f"step-{STEPS[0].step_id}", id="wizard-body"):
            for cls in STEPS:
                yield cls()
        with Horizontal(id="wizard-nav"):
            yield Button("< Back", id="wizard-back", compact=True)
            yield Static("", id="wizard-help")
            yield Button("Next >", id="wizard-next", compact=True, variant="primary")
        yield Footer()

    def on_mount(self) -> None:
        self.detect_hardware()
        self.load_draft(self.draft)

    @property
    def steps(self) -> list[WizardStep]:
        return list(self.query_one("#wizard-body", ContentSwitcher).query_children(WizardStep))

    def step(self, step_id: str) -> WizardStep:
        return self.query_one(f"#step-{step_id}", WizardStep)

    @property
    def current_step(self) -> WizardStep:
        return self.steps[self.index]

    # --- the draft ----------------------------------------------------------------------------

    def load_draft(self, draft: Draft) -> None:
        """Show ``draft`` in every step (a new profile, or one opened for editing)."""
        self.draft = draft
        self.data_columns = None
        self._shape_key = None
        indicator = self.query_one(StepIndicator)
        indicator.done.clear()
        indicator.failed.clear()
        self.request_shape()
        for step in self.steps:
            step.load()
        self.show_step(0)

    def draft_changed(self, path: str) -> None:
        if path.startswith("model."):
            self.request_shape()
        self.update_title()

    def saved(self, path: Path) -> None:
        self.update_title()

    def update_title(self) -> None:
        step = self.current_step
        d = self.draft
        name = d.name or "unnamed"
        if d.source is None:
            where = f"new profile {name}"
        else:
            where = f"{name}" + (" (modified)" if d.changed else "")
        show(self.query_one("#wizard-title", Static),
             f"[b]{self.index + 1}/{len(STEPS)} {step.title}[/b]  {step.summary}  [dim]{where}[/]")

    # --- navigation ---------------------------------------------------------------------------

    def show_step(self, index: int) -> None:
        self.index = max(0, min(index, len(STEPS) - 1))
        step = self.current_step
        self.query_one("#wizard-body", ContentSwitcher).current = step.id
        self.query_one(StepIndicator).current = self.index
        self.query_one("#wizard-back", Button).disabled = self.index == 0
        nxt = self.query_one("#wizard-next", Button)
        nxt.display = self.index < len(STEPS) - 1
        self.update_title()
        step.on_enter()
        self.call_after_refresh(self.focus_step)

    def focus_step(self) -> None:
        step = self.current_step
        for w in step.query("*"):
            if w.focusable and w.display and getattr(w.parent, "display", True):
                w.focus()
                return

    async def action_next(self) -> None:
        step = self.current_step
        ok = await step.check()
        indicator = self.query_one(StepIndicator)
        indicator.mark(self.index, done=ok, failed=not ok)
        if not ok:
            show(self.query_one("#wizard-help", Static), "[b red]Fix the marked fields to go on.[/]")
            return
        if self.index < len(STEPS) - 1:
            self.show_step(self.index + 1)

    def action_back(self) -> None:
        if self.index > 0:
            self.show_step(self.index - 1)

    def action_goto(self, index: int) -> None:
        self.show_step(int(index))

    def action_goto_step(self, step_id: str) -> None:
        ids = [s.step_id for s in STEPS]
        if step_id in ids:
            self.show_step(ids.index(step_id))

    async def action_save(self) -> None:
        self.show_step(len(STEPS) - 1)
        await self.step("review").save(launch=False)  # type: ignore[attr-defined]

    async def action_launch(self) -> None:
        self.show_step(len(STEPS) - 1)
        await self.step("review").save(launch=True)  # type: ignore[attr-defined]

    def action_home(self) -> None:
        self.app.switch_mode("home")

    def mark_review(self, problems: int) -> None:
        self.query_one(StepIndicator).mark(len(STEPS) - 1, done=problems == 0,
                                           failed=problems > 0)

    @on(Button.Pressed, "#wizard-next")
    async def _next_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        await self.action_next()

    @on(Button.Pressed, "#wizard-back")
    def _back_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        self.action_back()

    def on_descendant_focus(self, event: Any) -> None:
        """The focused field's help text, in the bar at the bottom."""
        widget: Widget | None = event.widget if hasattr(event, "widget") else None
        node = widget
        while node is not None and not isinstance(node, Field):
            node = node.parent if isinstance(node.parent, Widget) else None
        help_line = self.query_one("#wizard-help", Static)
        if isinstance(node, Field):
            show(help_line, f"[dim]{node.help}[/]" if node.help else "")
        else:
            show(help_line, "")

    # --- the model's shape --------------------------------------------------------------------

    def request_shape(self) -> None:
        model = self.draft.get("model", {})
        if not isinstance(model, dict):
            model = {}
        key = json.dumps([model, str(self.draft.source_dir)], sort_keys=True, default=str)
        if key == self._shape_key:
            return
        self._shape_key = key
        if not model or (not model.get("path") and model.get("init") != "scratch"):
            self.shape = self.param_count = None
            self.shape_error = None
            self.shape_pending = False
            self.shape_changed()
            return
        self.shape_pending = True
        self.shape_changed()
        self._load_shape(key, dict(model), self.draft.source_dir)

    @work(thread=True, exclusive=True, exit_on_error=False, group="model-shape")
    def _load_shape(self, key: str, model: dict[str, Any], base_dir: Path) -> None:
        from pydantic import ValidationError

        shape = counts = None
        error = None
        try:
            shape, counts = load_shape(model, base_dir)
        except ValidationError as exc:
            first = exc.errors()[0]
            error = f"model.{'.'.join(str(x) for x in first['loc'][1:])}: {first['msg']}"
        except Exception as exc:  # ModelShapeError, network, bad config: shown, not raised
            error = str(exc)
        if not get_current_worker().is_cancelled:
            self.post_message(ShapeLoaded(key, shape, counts, error))

    @on(ShapeLoaded)
    def _shape_loaded(self, event: ShapeLoaded) -> None:
        if event.key != self._shape_key:
            return
        self.shape, self.param_count, self.shape_error = event.shape, event.counts, event.error
        self.shape_pending = False
        self.shape_changed()

    def shape_changed(self) -> None:
        model = self.step("model")
        model.show_shape()  # type: ignore[attr-defined]
        model.refresh_errors()
        if self.current_step.step_id in ("memory", "inference"):
            self.current_step.on_enter()

    # --- hardware -----------------------------------------------------------------------------

    def detect_hardware(self) -> None:
        given = getattr(self.app, "hardware", None)
        if given is not None:
            self.detected_hardware = given
            return
        self._detect_hardware()

    @work(thread=True, exclusive=True, exit_on_error=False, group="hardware")
    def _detect_hardware(self) -> None:
        from engine.planner import detect_hardware

        try:
            hw = detect_hardware()
        except Exception:  # no psutil/NVML answer: plan from the fields only
            hw = None
        self.post_message(HardwareDetected(hw))

    @on(HardwareDetected)
    def _hardware_detected(self, event: HardwareDetected) -> None:
        self.detected_hardware = event.hardware
        if self.current_step.step_id in ("memory", "inference"):
            self.current_step.on_enter()

    def nvme_free_bytes(self, nvme_path: Any) -> int:
        """Free space where NVMe offload would write (0 without a path: NVMe does not fit)."""
        if not isinstance(nvme_path, str) or not nvme_path:
            return 0
        if nvme_path not in self._nvme_free:
            where = self.draft.resolve(nvme_path) or Path(nvme_path)
            while not where.exists() and where != where.parent:
                where = where.parent
            try:
                self._nvme_free[nvme_path] = int(shutil.disk_usage(where).free)
            except OSError:
                self._nvme_free[nvme_path] = 0
        return self._nvme_free[nvme_path]
