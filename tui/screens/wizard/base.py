"""What every wizard step shares: the draft, its fields, inline errors and the Next check."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from textual import on
from textual.containers import Vertical, VerticalScroll
from textual.widgets import RadioButton, RadioSet, Static

from engine.profile import Problem
from tui.screens.wizard.draft import Draft
from tui.widgets.wizard_field import Field

if TYPE_CHECKING:
    from tui.screens.wizard.screen import WizardScreen


def show(widget: Static, content: object) -> None:
    """Update a Static only when its content changes (an update re-lays the screen out)."""
    if getattr(widget, "_shown_content", None) == content:
        return
    widget._shown_content = content  # type: ignore[attr-defined]
    widget.update(content)  # type: ignore[arg-type]


def matches(problem_path: str, field_path: str) -> bool:
    return problem_path == field_path or problem_path.startswith(field_path + ".")


class StepScroll(VerticalScroll, can_focus=False):
    """A step's scrolling body: Tab moves between fields, the body follows the focus."""


class WizardStep(Vertical):
    """One step of the wizard. Subclasses compose Fields and declare what they own."""

    step_id: ClassVar[str] = ""
    title: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    # Profile paths this step is answerable for: their problems block Next here.
    owns: ClassVar[tuple[str, ...]] = ()

    def __init__(self) -> None:
        super().__init__(id=f"step-{self.step_id}", classes="wizard-step")
        self.show_all = False  # after a Next attempt, show every problem, touched or not
        self.problems: list[Problem] = []

    @property
    def wizard(self) -> WizardScreen:
        return self.screen  # type: ignore[return-value]

    @property
    def draft(self) -> Draft:
        return self.wizard.draft

    # --- hooks for subclasses -----------------------------------------------------------------

    def load(self) -> None:
        """Show the draft's values (called when a draft is loaded into the wizard)."""
        self.show_all = False
        for f in self.query(Field):
            f.load(self.draft)
        self.after_load()
        self.refresh_errors()

    def after_load(self) -> None:
        """Step-specific display of the draft (beyond plain fields)."""

    def on_enter(self) -> None:
        """The step became the current one (refresh what depends on other steps)."""
        self.refresh_errors()

    def after_edit(self, path: str) -> None:
        """A field of this step changed; the draft already holds the new value."""

    def extra_problems(self) -> list[Problem]:
        """Problems the schema cannot see (data columns, estimator input, ...)."""
        return []

    async def prepare_check(self) -> None:
        """Finish any pending background check that Next depends on."""

    # --- problems -----------------------------------------------------------------------------

    def owned(self, path: str) -> bool:
        return any(matches(path, p) for p in self.owns)

    def collect_problems(self) -> list[Problem]:
        _, problems = self.draft.validate()
        mine = [p for p in problems if self.owned(p.path)]
        return mine + self.extra_problems()

    def refresh_errors(self) -> list[Problem]:
        self.problems = self.collect_problems()
        fields = [f for f in self.query(Field) if f.display and f.parent is not None
                  and getattr(f.parent, "display", True)]
        shown: set[int] = set()
        for f in fields:
            msgs = [p.message for i, p in enumerate(self.problems) if matches(p.path, f.path)
                    and (self.show_all or f.path in self.draft.touched
                         or any(t.startswith(f.path + ".") for t in self.draft.touched))]
            for i, p in enumerate(self.problems):
                if matches(p.path, f.path):
                    shown.add(i)
            f.set_error("; ".join(msgs) if msgs else None)
        rest = [p for i, p in enumerate(self.problems) if i not in shown]
        box = self.query("#step-problems")
        if box:
            visible = self.show_all or bool(self.draft.touched)
            text = "\n".join(f"{p.path or 'profile'}: {p.message}" for p in rest)
            show(box.first(Static), text if visible else "")
            box.first(Static).display = bool(text) and visible
        return self.problems

    async def check(self) -> bool:
        """Called by Next: show every problem of this step; True when there is none."""
        await self.prepare_check()
        self.show_all = True
        problems = self.refresh_errors()
        if problems:
            self.focus_first_problem()
        return not problems

    def focus_first_problem(self) -> None:
        for f in self.query(Field):
            if f.error:
                f.focus_control()
                f.scroll_visible()
                return

    # --- events -------------------------------------------------------------------------------

    @on(Field.Edited)
    def _field_edited(self, event: Field.Edited) -> None:
        event.stop()
        self.draft.put(event.path, event.value)
        self.after_edit(event.path)
        self.refresh_errors()
        self.wizard.draft_changed(event.path)


def problems_box() -> Static:
    """The step's box for problems that belong to no single field (placed by the step)."""
    box = Static("", id="step-problems", classes="step-problems")
    box.display = False
    return box


def set_radio(radio_set: RadioSet, button_id: str) -> None:
    """Press a radio button without posting RadioSet.Changed."""
    button = radio_set.query_one(f"#{button_id}", RadioButton)
    if button.value:
        return
    with radio_set.prevent(RadioSet.Changed):
        button.value = True
