"""Step 7, Review: the profile as YAML, the DeepSpeed JSON, the exact launch command and every
problem; Save writes ``profiles/NAME.yaml``, Save & launch also starts the run and opens its
monitor."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.syntax import Syntax
from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.containers import Horizontal, VerticalScroll
from textual.message import Message
from textual.widgets import Button, Static, TabbedContent, TabPane
from textual.worker import get_current_worker

from engine.profile import Problem
from tui.screens.wizard.base import WizardStep
from tui.screens.wizard.draft import Draft
from tui.widgets.common_confirm import ConfirmScreen
from tui.widgets.wizard_field import Field

RUN_DIR_PLACEHOLDER = Path("runs") / "<run-id>"


@dataclass
class Review:
    seq: int
    yaml: str
    problems: list[Problem] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    ds_json: str | None = None
    command: str | None = None
    placement: str | None = None
    launch_problems: list[Problem] = field(default_factory=list)


def build_review(seq: int, draft: Draft) -> Review:
    """Validate the draft fully (data and model too) and render what a launch would use."""
    from engine.dsconfig import build_ds_config, resolve_placement
    from engine.launcher import build_command
    from engine.runner import preflight

    review = Review(seq, draft.to_yaml())
    lp, problems = draft.validate(check_data=True, check_model=True)
    review.problems = problems
    if lp is None:
        return review
    review.warnings = list(lp.warnings)
    placement = resolve_placement(lp)
    review.placement = (f"{placement.device}, {placement.num_nodes} node(s) x "
                        f"{placement.gpus_per_node} rank(s), {placement.dtype}")
    review.ds_json = json.dumps(build_ds_config(lp, placement), indent=2)
    port = lp.profile.resources.master_port
    cmd = build_command(lp, placement, RUN_DIR_PLACEHOLDER,
                        master_port=port if isinstance(port, int) else 29500)
    review.command = cmd.shell()
    launch_problems, more = preflight(lp, placement)
    review.launch_problems = launch_problems
    review.warnings += more
    return review


class Reviewed(Message):
    def __init__(self, review: Review) -> None:
        super().__init__()
        self.review = review


class Launched(Message):
    def __init__(self, run_id: str | None, error: str | None = None,
                 problems: list[Problem] | None = None) -> None:
        super().__init__()
        self.run_id = run_id
        self.error = error
        self.problems = problems or []


def start_run_from(path: Path, workspace: Path) -> Any:
    """Load the saved profile and hand it to the run manager (a detached supervisor)."""
    from engine.profile import load_profile
    from engine.runner import start_run

    lp = load_profile(path)
    return start_run(lp, workspace)


class ReviewStep(WizardStep):
    step_id = "review"
    title = "Review"
    summary = "Check the profile, the DeepSpeed JSON and the command; save, or save and launch."
    owns = ("",)  # everything: the whole profile must validate

    def __init__(self) -> None:
        super().__init__()
        self._seq = 0
        self.review: Review | None = None
        self._review_worker = None
        self.launching = False
        self.last_run_id: str | None = None

    def compose(self) -> ComposeResult:
        yield Field("name", "Profile name", placeholder="letters, digits, . _ -",
                    help="The file is profiles/NAME.yaml; runs are listed under this name")
        yield Field("description", "Description", wide=True, show_help=False,
                    help="One line shown in the run history")
        yield Static("", id="review-target", classes="info")
        with TabbedContent(id="review-tabs"):
            with TabPane("Problems", id="tab-problems"):
                with VerticalScroll():
                    yield Static("checking ...", id="review-problems")
            with TabPane("Profile YAML", id="tab-yaml"):
                with VerticalScroll():
                    yield Static("", id="review-yaml")
            with TabPane("DeepSpeed JSON", id="tab-ds"):
                with VerticalScroll():
                    yield Static("", id="review-ds")
            with TabPane("Command", id="tab-cmd"):
                with VerticalScroll():
                    yield Static("", id="review-cmd")
        with Horizontal(id="review-buttons"):
            yield Static("", id="review-status")
            yield Button("Save  ^s", id="review-save", compact=True)
            yield Button("Save & launch  ^r", id="review-launch", compact=True, variant="primary")

    def owned(self, path: str) -> bool:
        return True

    def collect_problems(self) -> list[Problem]:
        # Fields of this step get the schema's word at once; the full check is in the worker.
        _, problems = self.draft.validate()
        return [p for p in problems if p.path in ("name", "description")]

    def on_enter(self) -> None:
        super().on_enter()
        self.refresh_review()

    def after_edit(self, path: str) -> None:
        self.refresh_review()

    def show_target(self) -> None:
        d = self.draft
        target = d.target_path()
        rel = Path("profiles") / target.name
        if d.source is not None and d.source.resolve() == target.resolve():
            state = "unchanged" if not d.changed else "overwrites the file it was opened from"
        elif target.exists():
            state = "a file of this name exists: Save asks before overwriting"
        else:
            state = "new file"
        self.query_one("#review-target", Static).update(f"Saves to {rel} ({state})")

    # --- the review worker --------------------------------------------------------------------

    def refresh_review(self) -> None:
        self._seq += 1
        self.show_target()
        self.query_one("#review-problems", Static).update("checking ...")
        self._review_worker = self._run_review(self._seq, copy.deepcopy(self.draft))

    @work(thread=True, exclusive=True, exit_on_error=False, group="review")
    def _run_review(self, seq: int, draft: Draft) -> Review:
        try:
            review = build_review(seq, draft)
        except Exception as exc:  # shown as a problem; the wizard stays usable
            review = Review(seq, draft.to_yaml(), [Problem("", f"{type(exc).__name__}: {exc}")])
        if not get_current_worker().is_cancelled:
            self.post_message(Reviewed(review))
        return review

    @on(Reviewed)
    def _reviewed(self, event: Reviewed) -> None:
        event.stop()
        if event.review.seq != self._seq:
            return
        self.show_review(event.review)

    def show_review(self, r: Review) -> None:
        self.review = r
        self.query_one("#review-yaml", Static).update(
            Syntax(r.yaml, "yaml", theme="ansi_dark", background_color="default",
                   word_wrap=True))
        self.query_one("#review-ds", Static).update(
            Syntax(r.ds_json, "json", theme="ansi_dark", background_color="default")
            if r.ds_json else Text("fix the problems first", style="dim"))
        cmd = Text()
        if r.command:
            cmd.append(r.command)
            cmd.append(f"\n\nPlacement here: {r.placement}. The run id and a free port are chosen "
                       "at launch.", style="dim")
        else:
            cmd.append("fix the problems first", style="dim")
        self.query_one("#review-cmd", Static).update(cmd)
        out = Text()
        if not r.problems and not r.launch_problems:
            out.append("No problems: the profile validates.\n", style="bold green")
        for p in r.problems:
            out.append(f"{p.path or 'profile'}: ", style="bold red")
            out.append(p.message + "\n")
        for p in r.launch_problems:
            out.append(f"{p.path} (launch here): ", style="bold yellow")
            out.append(p.message + "\n")
        for w in r.warnings:
            out.append("warning: ", style="yellow")
            out.append(w + "\n")
        self.query_one("#review-problems", Static).update(out)
        n = len(r.problems)
        tabs = self.query_one("#review-tabs", TabbedContent)
        tabs.get_tab("tab-problems").label = f"Problems ({n})" if n else "Problems (0)"
        self.wizard.mark_review(n)

    async def prepare_check(self) -> None:
        worker = self._review_worker
        if worker is None:
            self.refresh_review()
            worker = self._review_worker
        await worker.wait()
        if worker.result is not None and worker.result.seq == self._seq:
            self.show_review(worker.result)

    def extra_problems(self) -> list[Problem]:
        r = self.review
        if r is None or r.seq != self._seq:
            return []
        return [p for p in r.problems if p.path not in ("name", "description")]

    # --- save and launch ----------------------------------------------------------------------

    @on(Button.Pressed, "#review-save")
    async def _save_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        await self.save(launch=False)

    @on(Button.Pressed, "#review-launch")
    async def _launch_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        await self.save(launch=True)

    def status(self, message: str, style: str = "") -> None:
        self.query_one("#review-status", Static).update(Text(message, style=style))

    async def save(self, launch: bool) -> None:
        if self.launching:
            return
        if not await self.check():
            self.query_one("#review-tabs", TabbedContent).active = "tab-problems"
            self.status("Not saved: fix the problems listed.", "bold red")
            return
        r = self.review
        if launch and r is not None and r.launch_problems:
            self.query_one("#review-tabs", TabbedContent).active = "tab-problems"
            self.status("Cannot launch on this machine: see Problems.", "bold red")
            return
        d = self.draft
        target = d.target_path()
        same = d.source is not None and d.source.resolve() == target.resolve()
        if target.exists() and not same:
            rel = Path("profiles") / target.name

            def answered(yes: bool | None) -> None:
                if yes:
                    self.call_later(self._write, launch)
                else:
                    self.status("Not saved.")

            self.app.push_screen(ConfirmScreen(f"{rel} exists. Overwrite it?", yes="Overwrite"),
                                 answered)
            return
        await self._write(launch)

    async def _write(self, launch: bool) -> None:
        d = self.draft
        try:
            path = d.save()
        except OSError as exc:
            self.status(f"Not saved: {exc}", "bold red")
            return
        rel = Path("profiles") / path.name
        self.show_target()
        self.wizard.saved(path)
        if not launch:
            self.status(f"Saved {rel}.", "green")
            self.app.notify(f"Saved {rel}", title="Profile")
            return
        self.launching = True
        self.status(f"Saved {rel}; starting the run ...", "green")
        self._launch(path, self.app.workspace)  # type: ignore[attr-defined]

    @work(thread=True, exclusive=True, exit_on_error=False, group="launch")
    def _launch(self, path: Path, workspace: Path) -> None:
        from engine.profile import ProfileError

        try:
            prepared = start_run_from(path, workspace)
        except ProfileError as exc:
            self.post_message(Launched(None, "the run could not start", exc.problems))
        except Exception as exc:  # the reason is shown; the wizard stays open
            self.post_message(Launched(None, f"{type(exc).__name__}: {exc}"))
        else:
            self.post_message(Launched(prepared.run_id))

    @on(Launched)
    def _launched(self, event: Launched) -> None:
        event.stop()
        self.launching = False
        if event.run_id is None:
            self.status(f"Not launched: {event.error}", "bold red")
            if event.problems:
                out = Text()
                for p in event.problems:
                    out.append(f"{p.path or 'profile'}: ", style="bold red")
                    out.append(p.message + "\n")
                self.query_one("#review-problems", Static).update(out)
                self.query_one("#review-tabs", TabbedContent).active = "tab-problems"
            return
        self.last_run_id = event.run_id
        self.status(f"Run {event.run_id} started.", "bold green")
        self.app.open_run(event.run_id)  # type: ignore[attr-defined]
