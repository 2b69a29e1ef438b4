"""The zerotune terminal UI: home, the planning wizard and the runs area, as Textual modes.

Importing this module loads Textual and nothing heavy: the screens import the engine modules
they need (pure Python) and do slow work (database reads, data reports, estimates) in workers.
``zerotune`` alone (or ``zerotune tui``) calls :func:`main`.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any, ClassVar

from textual.app import App, SystemCommand
from textual.binding import Binding, BindingType
from textual.screen import Screen


class ZerotuneApp(App[int]):
    """Modes: ``home`` (live and recent runs), ``wizard`` (plan a run), ``runs`` (history)."""

    CSS_PATH = "app.tcss"
    TITLE = "zerotune"
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("ctrl+q", "quit", "Quit", show=False, priority=True),
        Binding("f1", "home", "Home", show=False),
    ]

    def __init__(self, workspace: Path | str, *, hardware: Any = None, blink_cursor: bool = True,
                 poll_interval: float = 2.0) -> None:
        """``hardware`` (an ``engine.planner.Hardware``) replaces detection, for tests and
        snapshots; ``blink_cursor=False`` keeps screenshots stable."""
        super().__init__()
        self.workspace = Path(workspace).resolve()
        self.hardware = hardware
        self.blink_cursor = blink_cursor
        self.poll_interval = poll_interval
        self.wizard: Any = None  # the WizardScreen, once the wizard mode was opened
        self._next_draft: Any = None
        self.add_mode("home", self._make_home)
        self.add_mode("wizard", self._make_wizard)
        self.add_mode("runs", self._make_runs)

    @property
    def profiles_dir(self) -> Path:
        return self.workspace / "profiles"

    # --- modes --------------------------------------------------------------------------------

    def _make_home(self) -> Screen:
        from tui.screens.home import HomeScreen

        return HomeScreen(self.workspace)

    def _make_wizard(self) -> Screen:
        from tui.screens.wizard.screen import WizardScreen

        draft, self._next_draft = self._next_draft, None
        self.wizard = WizardScreen(self.workspace, draft)
        return self.wizard

    def _make_runs(self) -> Screen:
        from tui.screens.history import HistoryScreen

        return HistoryScreen(self.workspace)

    def on_mount(self) -> None:
        self.switch_mode("home")

    # --- actions ------------------------------------------------------------------------------

    def action_home(self) -> None:
        self.switch_mode("home")

    def action_new_run(self) -> None:
        """Open the wizard on a new profile (asking first if a draft has unsaved changes)."""
        from tui.screens.wizard.draft import Draft

        self._to_wizard(lambda: Draft.new(self.profiles_dir))

    def action_open_profile(self) -> None:
        from tui.widgets.common_open_profile import OpenProfileScreen

        def chosen(path: Path | None) -> None:
            if path is not None:
                self.open_profile_in_wizard(path)

        self.push_screen(OpenProfileScreen(self.profiles_dir), chosen)

    def open_profile_in_wizard(self, path: Path) -> bool:
        """Open a profile file in the wizard to change it and save or launch it. Returns
        False (with a notification) when the file cannot be read as a profile."""
        from engine.problems import ProfileError
        from tui.screens.wizard.draft import Draft

        try:
            draft = Draft.open(Path(path), self.profiles_dir)
        except ProfileError as exc:
            self.notify(exc.report(), title="Cannot open the profile", severity="error",
                        timeout=10)
            return False
        self._to_wizard(lambda: draft)
        return True

    def _to_wizard(self, make_draft: Any) -> None:
        wizard = self.wizard
        if wizard is not None and wizard.draft.changed:
            from tui.widgets.common_confirm import ConfirmScreen

            def answered(discard: bool | None) -> None:
                if discard:
                    self._show_in_wizard(make_draft())

            name = wizard.draft.name or "the current profile"
            self.push_screen(ConfirmScreen(f"Discard the unsaved changes to {name}?",
                                           yes="Discard"), answered)
            return
        self._show_in_wizard(make_draft())

    def _show_in_wizard(self, draft: Any) -> None:
        if self.wizard is None:
            self._next_draft = draft
            self.switch_mode("wizard")
            return
        self.switch_mode("wizard")
        while self.screen is not self.wizard and len(self.screen_stack) > 1:
            self.pop_screen()
        self.wizard.load_draft(draft)

    def action_history(self) -> None:
        try:
            import tui.screens.history  # noqa: F401
        except ImportError:
            self.notify("The run history is not part of this build yet; use zerotune runs list.",
                        severity="warning")
            return
        self.switch_mode("runs")

    def open_run(self, run_id: str, *, finished: bool = False) -> None:
        """Show a run over the current screen: its monitor, or for a run that has ended its
        detail page (where the run area has one)."""
        if finished:
            try:
                from tui.screens.run_detail import RunDetailScreen
            except ImportError:
                pass
            else:
                self.push_screen(RunDetailScreen(self.workspace, run_id))
                return
        try:
            from tui.screens.monitor import MonitorScreen
        except ImportError:
            self.notify(f"Run {run_id}: the monitor is not part of this build yet; follow it with "
                        f"zerotune runs logs {run_id} -f", title="Run started", timeout=10)
            return
        self.push_screen(MonitorScreen(self.workspace, run_id))

    # --- the command palette ------------------------------------------------------------------

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        yield SystemCommand("New run", "Plan a new run in the wizard", self.action_new_run)
        yield SystemCommand("Open profile", "Open a profile in the wizard to change or launch it",
                            self.action_open_profile)
        yield SystemCommand("History", "Browse every run of this workspace", self.action_history)
        yield SystemCommand("Home", "Live and recent runs", self.action_home)
        from tui.widgets.common_open_profile import profile_files

        for path in profile_files(self.profiles_dir):
            yield SystemCommand(f"Open profile {path.stem}", f"Edit {path} in the wizard",
                                lambda p=path: self.open_profile_in_wizard(p), discover=False)
        from tui.screens.home import HomeScreen

        if isinstance(screen, HomeScreen) and screen.snapshot is not None:
            for r in screen.snapshot.live + screen.snapshot.recent[:10]:
                done = r in screen.snapshot.recent
                yield SystemCommand(f"{'Show' if done else 'Monitor'} run {r['id']} "
                                    f"{r.get('name') or ''}",
                                    f"{r.get('status')}, {r.get('method') or ''}",
                                    lambda rid=r["id"], done=done: self.open_run(
                                        rid, finished=done), discover=False)
        if self.wizard is not None and screen is self.wizard:
            w = self.wizard
            yield SystemCommand("Next step", "Check this step and go on", w.action_next)
            yield SystemCommand("Previous step", "Go back (answers are kept)", w.action_back)
            from tui.screens.wizard.screen import STEPS

            for i, step in enumerate(STEPS):
                yield SystemCommand(f"Go to step {i + 1}: {step.title}", step.summary,
                                    lambda i=i: w.action_goto(i))
            yield SystemCommand("Save profile", "Validate and write profiles/NAME.yaml",
                                w.action_save)
            yield SystemCommand("Save & launch", "Save the profile and start the run",
                                w.action_launch)
            yield SystemCommand("Use the recommended ZeRO option",
                                "Apply the memory step's recommendation",
                                w.step("memory").action_use_recommended)
        yield from super().get_system_commands(screen)


def main(workspace: str | Path | None = None) -> int:
    """Run the TUI on a workspace (default: ``$ZEROTUNE_HOME`` or the current directory)."""
    from engine.workspace import resolve_workspace

    app = ZerotuneApp(resolve_workspace(workspace))
    app.run()
    return int(app.return_code or 0)
