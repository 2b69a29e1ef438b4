"""Choose a profile to open: the workspace's ``profiles/*.yaml``, or any path typed in."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Input, Label, OptionList, Static
from textual.widgets.option_list import Option


def profile_files(profiles_dir: Path) -> list[Path]:
    if not profiles_dir.is_dir():
        return []
    return sorted(p for p in profiles_dir.iterdir()
                  if p.suffix in (".yaml", ".yml") and p.is_file())


def profile_summary(path: Path) -> str:
    """The profile's ``description`` line, read cheaply (no validation)."""
    try:
        with open(path, encoding="utf-8") as fh:
            for _, line in zip(range(40), fh, strict=False):
                if line.startswith("description:"):
                    return line.split(":", 1)[1].strip().strip("'\"")
    except OSError:
        pass
    return ""


class OpenProfileScreen(ModalScreen[Path | None]):
    """Dismisses with the chosen path, or None."""

    DEFAULT_CSS = """
    OpenProfileScreen { align: center middle; }
    OpenProfileScreen > Vertical {
        width: 76; max-width: 100%; height: auto; max-height: 90%;
        border: thick $accent; background: $surface; padding: 0 1;
    }
    OpenProfileScreen OptionList { height: auto; max-height: 14; }
    OpenProfileScreen Input { margin-top: 1; }
    OpenProfileScreen #open-error { color: $error; height: auto; }
    """

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, profiles_dir: Path) -> None:
        super().__init__()
        self.profiles_dir = profiles_dir
        self.files = profile_files(profiles_dir)

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label("[b]Open a profile[/b]  Enter opens it in the wizard; Escape cancels")
            options = []
            for p in self.files:
                desc = profile_summary(p)
                options.append(Option(f"{p.name:22s} [dim]{desc[:48]}[/]", id=str(p)))
            if options:
                yield OptionList(*options, id="open-list")
            else:
                yield Static(f"[dim]No profiles in {self.profiles_dir}[/]")
            yield Input(placeholder="or a path to a profile YAML", id="open-path", compact=True)
            yield Static("", id="open-error")

    def on_mount(self) -> None:
        if not getattr(self.app, "blink_cursor", True):
            self.query_one("#open-path", Input).cursor_blink = False

    @on(OptionList.OptionSelected)
    def _chosen(self, event: OptionList.OptionSelected) -> None:
        event.stop()
        if event.option.id:
            self.dismiss(Path(event.option.id))

    @on(Input.Submitted, "#open-path")
    def _typed(self, event: Input.Submitted) -> None:
        event.stop()
        value = event.value.strip()
        if not value:
            return
        path = Path(value).expanduser()
        if not path.is_absolute():
            path = (self.profiles_dir.parent / path).resolve()
        if not path.is_file():
            self.query_one("#open-error", Static).update(f"not found: {path}")
            return
        self.dismiss(path)

    def action_cancel(self) -> None:
        self.dismiss(None)
