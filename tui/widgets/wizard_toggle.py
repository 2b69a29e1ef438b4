"""A checkbox and a radio button whose state shows without colour: a mark when on, a blank
when off (Textual's own draw the same glyph both ways and tell them apart by colour only)."""

from __future__ import annotations

from textual.widgets import Checkbox, RadioButton


class Toggle(Checkbox):
    """A Checkbox showing X when on and a blank when off."""

    @property
    def BUTTON_INNER(self) -> str:  # type: ignore[override]
        return "X" if self.value else " "


class Choice(RadioButton):
    """A RadioButton showing a star when chosen and a blank otherwise."""

    @property
    def BUTTON_INNER(self) -> str:  # type: ignore[override]
        return "*" if self.value else " "
