"""The wizard's step indicator: one line, the current step highlighted, each step clickable."""

from __future__ import annotations

from collections.abc import Sequence

from rich.text import Text
from textual.reactive import reactive
from textual.widget import Widget


class StepIndicator(Widget):
    """``1 Data  2 Model  3 Method ...``: done steps marked, the current one reversed."""

    DEFAULT_CSS = """
    StepIndicator { height: 1; width: 1fr; }
    """

    current: reactive[int] = reactive(0)

    def __init__(self, titles: Sequence[str], *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.titles = list(titles)
        self.done: set[int] = set()
        self.failed: set[int] = set()
        self._spans: list[tuple[int, int]] = []

    def mark(self, index: int, *, done: bool | None = None, failed: bool | None = None) -> None:
        if done is not None:
            (self.done.add if done else self.done.discard)(index)
        if failed is not None:
            (self.failed.add if failed else self.failed.discard)(index)
        self.refresh()

    def render(self) -> Text:
        text = Text(no_wrap=True, overflow="ellipsis")
        self._spans = []
        for i, title in enumerate(self.titles):
            if i:
                text.append(" ")
            start = len(text)
            label = f" {i + 1} {title} "
            if i == self.current:
                style = "bold reverse"
            elif i in self.failed:
                style = "bold red"
            elif i in self.done:
                style = "green"
            else:
                style = "dim"
            text.append(label, style=style)
            self._spans.append((start, len(text)))
        return text

    def on_click(self, event) -> None:
        x = event.x
        for i, (a, b) in enumerate(self._spans):
            if a <= x < b:
                goto = getattr(self.screen, "action_goto", None)
                if goto is not None:
                    goto(i)
                return
