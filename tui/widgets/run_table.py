"""A fast read-only table for lists of runs: fixed column widths, one strip per row.

Textual's DataTable renders every visible cell through Rich on each refresh (about 0.5 ms a
cell: a 40-row screen of 13 columns takes a few hundred milliseconds on a busy machine). Runs
lists have fixed column widths, so this table builds each row once as a single strip, caches
it, and draws only the rows in view; the cursor and zebra stripes are styles laid over the
cached strips. The header stays in view; the first ``fixed_columns`` stay when the table
scrolls sideways.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from rich.segment import Segment
from rich.style import Style
from rich.text import Text
from textual import events
from textual.binding import Binding, BindingType
from textual.geometry import Region, Size
from textual.message import Message
from textual.reactive import reactive
from textual.scroll_view import ScrollView
from textual.strip import Strip

Cell = str | Text


@dataclass(frozen=True)
class TableColumn:
    key: str
    label: Cell
    width: int
    justify: str = "left"


class RunTable(ScrollView, can_focus=True):
    """Rows of cells under a header; a row cursor moved by keys and clicks.

    Messages: :class:`RowHighlighted` when the cursor moves, :class:`RowSelected` on Enter or a
    double click, :class:`HeaderClicked` with the column key, :class:`EdgeReached` when the
    cursor is asked to move past the first or last row (for paging).
    """

    COMPONENT_CLASSES: ClassVar[set[str]] = {
        "run-table--header", "run-table--cursor", "run-table--even-row",
    }

    DEFAULT_CSS = """
    RunTable {
        background: $surface;
        color: $foreground;
        height: 1fr;
        & > .run-table--header {
            text-style: bold;
            background: $panel;
            color: $foreground;
        }
        & > .run-table--even-row {
            background: $surface-lighten-1 50%;
        }
        & > .run-table--cursor {
            background: $block-cursor-blurred-background;
            color: $block-cursor-blurred-foreground;
            text-style: $block-cursor-blurred-text-style;
        }
        &:focus > .run-table--cursor {
            background: $block-cursor-background;
            color: $block-cursor-foreground;
            text-style: $block-cursor-text-style;
        }
    }
    """

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("up", "cursor(-1)", "Up", show=False),
        Binding("down", "cursor(1)", "Down", show=False),
        Binding("pageup", "cursor_page(-1)", "Page up", show=False),
        Binding("pagedown", "cursor_page(1)", "Page down", show=False),
        Binding("home", "cursor_to(0)", "First", show=False),
        Binding("end", "cursor_to(-1)", "Last", show=False),
        Binding("enter", "select", "Open", show=False),
        Binding("left", "scroll_left", "Left", show=False),
        Binding("right", "scroll_right", "Right", show=False),
    ]

    cursor_row: reactive[int] = reactive(0, always_update=True)

    class _TableMessage(Message):
        def __init__(self, table: RunTable):
            super().__init__()
            self.table = table

        @property
        def control(self) -> RunTable:
            return self.table

    class RowHighlighted(_TableMessage):
        def __init__(self, table: RunTable, row: int):
            super().__init__(table)
            self.row = row

    class RowSelected(_TableMessage):
        def __init__(self, table: RunTable, row: int):
            super().__init__(table)
            self.row = row

    class HeaderClicked(_TableMessage):
        def __init__(self, table: RunTable, key: str):
            super().__init__(table)
            self.key = key

    class EdgeReached(_TableMessage):
        def __init__(self, table: RunTable, step: int):
            super().__init__(table)
            self.step = step

    def __init__(self, *, fixed_columns: int = 0, zebra_stripes: bool = True,
                 name: str | None = None, id: str | None = None, classes: str | None = None):
        super().__init__(name=name, id=id, classes=classes)
        self.columns: list[TableColumn] = []
        self.rows: list[Any] = []
        self._render_row: Callable[[Any], Sequence[Cell]] = list
        self._cells: dict[int, list[Cell]] = {}
        self.fixed_columns = fixed_columns
        self.zebra_stripes = zebra_stripes
        self._strips: dict[int, Strip] = {}
        self._header: Strip | None = None

    # -- content -------------------------------------------------------------------------

    @property
    def row_count(self) -> int:
        return len(self.rows)

    def set_columns(self, columns: Sequence[TableColumn]) -> None:
        self.columns = list(columns)
        self._strips.clear()
        self._header = None
        self._resize()

    def set_rows(self, rows: Sequence[Any], cursor: int | None = None,
                 render_row: Callable[[Any], Sequence[Cell]] | None = None) -> None:
        """Replace every row; the cursor goes to ``cursor`` (kept in range).

        Rows are lists of cells, or any objects with ``render_row`` turning one into its
        cells; that is called only for the rows drawn, so a long page costs nothing more.
        """
        self.rows = list(rows)
        self._render_row = render_row or list
        self._cells.clear()
        self._strips.clear()
        self._resize()
        target = self.cursor_row if cursor is None else cursor
        self.move_cursor(target, scroll=True)

    def refresh_row(self, row: int) -> None:
        """Render one row again (its object changed)."""
        self._cells.pop(row, None)
        self._strips.pop(row, None)
        self.refresh_line(row)

    def cells(self, row: int) -> list[Cell]:
        cells = self._cells.get(row)
        if cells is None:
            cells = self._cells[row] = list(self._render_row(self.rows[row]))
        return cells

    def get_row(self, row: int) -> list[str]:
        """The plain text of a row's cells."""
        return [c.plain if isinstance(c, Text) else str(c) for c in self.cells(row)]

    def _resize(self) -> None:
        self.virtual_size = Size(self._total_width(), len(self.rows) + 1)
        self.refresh()

    def _total_width(self) -> int:
        return sum(c.width + 2 for c in self.columns)

    def _fixed_width(self) -> int:
        return sum(c.width + 2 for c in self.columns[: self.fixed_columns])

    def notify_style_update(self) -> None:
        super().notify_style_update()
        self._strips.clear()
        self._header = None

    # -- cursor --------------------------------------------------------------------------

    def move_cursor(self, row: int, scroll: bool = True) -> None:
        if not self.rows:
            self.cursor_row = 0
            return
        if row < 0:
            row = len(self.rows) + row
        self.cursor_row = max(0, min(row, len(self.rows) - 1))
        if scroll:
            self._scroll_to_cursor()

    def watch_cursor_row(self, old: int, new: int) -> None:
        self.refresh_line(old)
        self.refresh_line(new)
        if self.rows:
            self.post_message(self.RowHighlighted(self, new))

    def refresh_line(self, row: int) -> None:
        """Redraw one row (by row index) if it is in view."""
        y = row - int(self.scroll_offset.y) + 1
        if 1 <= y < self.size.height:
            self.refresh(Region(0, y, self.size.width, 1))

    def _body_height(self) -> int:
        return max(1, self.size.height - 1 - (1 if self.show_horizontal_scrollbar else 0))

    def _scroll_to_cursor(self) -> None:
        top = int(self.scroll_offset.y)
        body = self._body_height()
        row = self.cursor_row
        if row < top:
            self.scroll_to(y=row, animate=False, immediate=True)
        elif row >= top + body:
            self.scroll_to(y=row - body + 1, animate=False, immediate=True)

    def action_cursor(self, step: int) -> None:
        if not self.rows:
            return
        target = self.cursor_row + step
        if target < 0 or target >= len(self.rows):
            self.post_message(self.EdgeReached(self, -1 if target < 0 else 1))
            return
        self.move_cursor(target)

    def action_cursor_page(self, step: int) -> None:
        if self.rows:
            self.move_cursor(self.cursor_row + step * self._body_height())

    def action_cursor_to(self, row: int) -> None:
        self.move_cursor(row)

    def action_select(self) -> None:
        if self.rows:
            self.post_message(self.RowSelected(self, self.cursor_row))

    def on_click(self, event: events.Click) -> None:
        x, y = event.x, event.y
        if y == 0:
            key = self._column_at(x)
            if key is not None:
                self.post_message(self.HeaderClicked(self, key))
            return
        row = int(self.scroll_offset.y) + y - 1
        if 0 <= row < len(self.rows):
            self.move_cursor(row, scroll=False)
            if event.chain >= 2:
                self.post_message(self.RowSelected(self, row))

    def _column_at(self, x: int) -> str | None:
        fixed = self._fixed_width()
        if x >= fixed:
            x += int(self.scroll_offset.x)
        left = 0
        for col in self.columns:
            right = left + col.width + 2
            if left <= x < right:
                return col.key
            left = right
        return None

    # -- drawing -------------------------------------------------------------------------

    def _cells_strip(self, cells: Sequence[Cell], base: Style) -> Strip:
        console = self.app.console
        segments: list[Segment] = []
        for col, cell in zip(self.columns, cells, strict=True):
            text = cell.copy() if isinstance(cell, Text) else Text(str(cell))
            text.truncate(col.width, overflow="ellipsis")
            if col.justify == "right":
                text.pad_left(col.width - text.cell_len)
            else:
                text.pad_right(col.width - text.cell_len)
            segments.append(Segment(" "))
            segments.extend(text.render(console))
            segments.append(Segment(" "))
        return Strip(Segment.apply_style(segments, base), self._total_width())

    def _row_strip(self, row: int) -> Strip:
        strip = self._strips.get(row)
        if strip is None:
            strip = self._cells_strip(self.cells(row), self.rich_style)
            self._strips[row] = strip
        return strip

    def _header_strip(self) -> Strip:
        if self._header is None:
            style = self.rich_style + self.get_component_rich_style("run-table--header")
            self._header = self._cells_strip([c.label for c in self.columns], style)
        return self._header

    def _fit(self, strip: Strip, width: int, style: Style) -> Strip:
        """Crop to the view: fixed columns, then the rest from the horizontal offset."""
        scroll_x = int(self.scroll_offset.x)
        fixed = self._fixed_width()
        if fixed and scroll_x:
            head = strip.crop(0, fixed)
            rest = strip.crop(fixed + scroll_x, fixed + scroll_x + max(0, width - fixed))
            strip = Strip.join([head, rest])
            return strip.extend_cell_length(width, style).crop(0, width)
        return strip.crop_extend(scroll_x, scroll_x + width, style)

    def render_line(self, y: int) -> Strip:
        width = self.size.width
        base = self.rich_style
        if not self.columns:
            return Strip.blank(width, base)
        if y == 0:
            header_style = base + self.get_component_rich_style("run-table--header")
            return self._fit(self._header_strip(), width, header_style)
        row = int(self.scroll_offset.y) + y - 1
        if row >= len(self.rows):
            return Strip.blank(width, base)
        strip = self._row_strip(row)
        if row == self.cursor_row and self.rows:
            over = self.get_component_rich_style("run-table--cursor")
        elif self.zebra_stripes and row % 2:
            over = self.get_component_rich_style("run-table--even-row")
        else:
            over = None
        line = self._fit(strip, width, base)
        if over is not None:
            # Laid over the cells' own styles: the cursor's background wins.
            line = Strip([Segment(text, style + over if style else over, control)
                          for text, style, control in line], line.cell_length)
        return line
