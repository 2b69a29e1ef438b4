"""A yes/no confirmation for run actions (stop, kill, delete, re-run, resume)."""

from __future__ import annotations

from typing import ClassVar
from dataclasses import dataclass

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Checkbox, Label, Static


@dataclass
class Confirmed:
    """The answer: ``option`` is the checkbox's value when one was offered."""

    option: bool = False


class ConfirmRunAction(ModalScreen["Confirmed | None"]):
    """Asks before an action; dismisses with :class:`Confirmed` or None (cancelled).

    ``option``: the label of a checkbox (off by default), e.g. "also delete the run directory".
    """

    DEFAULT_CSS = """
    ConfirmRunAction {
        align: center middle;
    }
    ConfirmRunAction > Vertical {
        width: 64;
        max-width: 100%;
        height: auto;
        border: thick $warning;
        background: $surface;
        padding: 0 1;
    }
    ConfirmRunAction .title {
        text-style: bold;
        width: 100%;
    }
    ConfirmRunAction .message {
        width: 100%;
        margin: 1 0 0 0;
    }
    ConfirmRunAction Checkbox {
        margin: 1 0 0 0;
    }
    ConfirmRunAction Horizontal {
        height: auto;
        align-horizontal: right;
        margin: 1 0 0 0;
    }
    ConfirmRunAction Button {
        margin: 0 0 0 1;
    }
    """

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape,n", "cancel", "Cancel"),
        Binding("y", "confirm", "Yes"),
    ]

    def __init__(self, title: str, message: str, confirm_label: str = "Yes",
                 option: str | None = None, danger: bool = False):
        super().__init__()
        self.title_text = title
        self.message = message
        self.confirm_label = confirm_label
        self.option = option
        self.danger = danger

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label(self.title_text, classes="title")
            yield Static(self.message, classes="message")
            if self.option:
                yield Checkbox(self.option, value=False, id="confirm-option", compact=True)
            with Horizontal():
                yield Button("Cancel (n)", id="cancel", compact=True)
                yield Button(f"{self.confirm_label} (y)", id="confirm", compact=True,
                             variant="error" if self.danger else "primary")

    def on_mount(self) -> None:
        self.query_one("#cancel", Button).focus()

    def action_confirm(self) -> None:
        option = self.query_one("#confirm-option", Checkbox).value if self.option else False
        self.dismiss(Confirmed(option=option))

    def action_cancel(self) -> None:
        self.dismiss(None)

    @on(Button.Pressed, "#confirm")
    def _confirm(self) -> None:
        self.action_confirm()

    @on(Button.Pressed, "#cancel")
    def _cancel(self) -> None:
        self.action_cancel()
