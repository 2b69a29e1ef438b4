"""One profile field in the wizard: label, control, help text from the schema, inline error.

A field knows its dotted profile path (``training.lr``). It shows the draft's value (or the
schema default) without emitting anything, and posts :class:`Field.Edited` with the typed
value only when the user changes it, so a draft records exactly what the user touched.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from textual import on
from textual.app import ComposeResult
from textual.containers import Horizontal
from textual.message import Message
from textual.widget import Widget
from textual.widgets import Checkbox, Input, Label, Select, Static

from tui.widgets.wizard_toggle import Toggle

from tui.screens.wizard.draft import Draft, format_value, help_of, parse_text


class Field(Widget):
    """A labelled control bound to one profile field."""

    DEFAULT_CSS = """
    Field { height: auto; }
    """

    class Edited(Message):
        """The user changed the field's value (already parsed to the schema's type)."""

        def __init__(self, field: Field, path: str, value: Any) -> None:
            super().__init__()
            self.field = field
            self.path = path
            self.value = value

        @property
        def control(self) -> Field:
            return self.field

    def __init__(
        self,
        path: str,
        label: str,
        *,
        kind: str = "text",
        options: Sequence[tuple[str, Any]] | None = None,
        help: str | None = None,
        placeholder: str = "",
        wide: bool = False,
        show_help: bool = True,
        id: str | None = None,
        classes: str | None = None,
    ) -> None:
        super().__init__(id=id, classes=classes)
        self.path = path
        self.label = label
        self.kind = kind
        self.options = list(options or [])
        self.help = help if help is not None else help_of(path)
        self.placeholder = placeholder
        self.wide = wide
        self.show_help = show_help
        self.error: str | None = None
        self._loaded = False  # controls post their own Changed on mount: not the user's
        self._shown: Any = None
        if wide:
            self.add_class("-wide")
        if not show_help:
            self.add_class("-nohelp")

    def compose(self) -> ComposeResult:
        with Horizontal(classes="field-row"):
            yield Label(self.label, classes="field-label")
            yield self._make_control()
            if self.show_help and not self.wide:
                yield Static(self.help, classes="field-help")
        if self.show_help and self.wide and self.help:
            yield Static(self.help, classes="field-help field-help-below")
        yield Static("", classes="field-error")

    def _make_control(self) -> Widget:
        cid = "control"
        if self.kind == "select":
            return Select(self.options, allow_blank=False, compact=True, id=cid,
                          classes="field-control")
        if self.kind == "bool":
            return Toggle("", compact=True, id=cid, classes="field-control")
        return Input(placeholder=self.placeholder, compact=True, id=cid, classes="field-control",
                     select_on_focus=False)

    def on_mount(self) -> None:
        control = self.control_widget
        control.tooltip = self.help or None
        if isinstance(control, Input) and not getattr(self.app, "blink_cursor", True):
            control.cursor_blink = False

    @property
    def control_widget(self) -> Widget:
        return self.query_one("#control")

    # --- values -------------------------------------------------------------------------------

    def show_value(self, value: Any) -> None:
        """Display a value without posting Edited."""
        self._loaded = True
        self._shown = value
        control = self.control_widget
        if isinstance(control, Select):
            with control.prevent(Select.Changed):
                known = [v for _, v in self.options]
                if value in known:
                    control.value = value
                elif value is not None and str(value) in [str(v) for v in known]:
                    control.value = known[[str(v) for v in known].index(str(value))]
        elif isinstance(control, Checkbox):
            with control.prevent(Checkbox.Changed):
                control.value = bool(value)
        elif isinstance(control, Input):
            with control.prevent(Input.Changed):
                control.value = format_value(value)
                control.cursor_position = len(control.value)

    def load(self, draft: Draft) -> None:
        self.show_value(draft.value(self.path))

    def current(self) -> Any:
        control = self.control_widget
        if isinstance(control, Select):
            return control.value
        if isinstance(control, Checkbox):
            return control.value
        assert isinstance(control, Input)
        return parse_text(self.path, control.value)

    def set_error(self, message: str | None) -> None:
        if message == self.error:
            return
        self.error = message
        err = self.query_one(".field-error", Static)
        err.update(message or "")
        self.set_class(bool(message), "-invalid")

    def focus_control(self) -> None:
        self.control_widget.focus()

    # --- events -------------------------------------------------------------------------------

    def _user_changed(self, value: Any) -> bool:
        """Whether a control's Changed is the user's (not mount or show_value)."""
        if not self._loaded or value == self._shown:
            return False
        self._shown = value
        return True

    @on(Input.Changed, "#control")
    def _input_changed(self, event: Input.Changed) -> None:
        event.stop()
        if not self._loaded:
            return
        self._shown = parse_text(self.path, event.value)
        self.post_message(self.Edited(self, self.path, parse_text(self.path, event.value)))

    @on(Input.Submitted, "#control")
    def _input_submitted(self, event: Input.Submitted) -> None:
        # Enter moves on like Tab: forms are filled top to bottom.
        event.stop()
        self.screen.focus_next()

    @on(Select.Changed, "#control")
    def _select_changed(self, event: Select.Changed) -> None:
        event.stop()
        if event.value is Select.NULL or not self._user_changed(event.value):
            return
        self.post_message(self.Edited(self, self.path, event.value))

    @on(Checkbox.Changed, "#control")
    def _checkbox_changed(self, event: Checkbox.Changed) -> None:
        event.stop()
        if not self._user_changed(event.value):
            return
        self.post_message(self.Edited(self, self.path, event.value))


def choices(values: Sequence[Any], labels: dict[Any, str] | None = None) -> list[tuple[str, Any]]:
    """Select options from literal values, with optional display labels."""
    labels = labels or {}
    return [(labels.get(v, str(v)), v) for v in values]
