"""How the run screens present figures: status colours and compact numbers, and the history
database as the run screens' worker threads read it.

The figures themselves come from :mod:`engine.history` (and :mod:`engine.runs_cli` for the
reports the CLI prints), so ``zerotune runs`` and the TUI show the same data.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

from rich.text import Text

from engine import history
from engine.runs_cli import fmt_bytes, fmt_duration, fmt_num
from engine.workspace import db_path

__all__ = ["STATUS_STYLES", "HistoryReader", "display_path", "fmt_bytes", "fmt_clock",
           "fmt_duration", "fmt_num", "fmt_start", "run_label", "short_bytes", "status_text"]

# Colours that read on dark and light themes and in 256-colour terminals.
STATUS_STYLES = {
    "starting": "bold cyan",
    "running": "bold green",
    "completed": "green",
    "failed": "bold red",
    "stopped": "yellow",
    "lost": "magenta",
    "stalled": "bold yellow",
}


def status_text(status: str | None) -> Text:
    status = status or "unknown"
    return Text(status, style=STATUS_STYLES.get(status, "dim"))


def short_bytes(n: float | None) -> str:
    """``1.1G``-style sizes for narrow table columns."""
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "K", "M", "G", "T"):
        if abs(value) < 1024 or unit == "T":
            return f"{value:.0f}{unit}" if unit in ("B", "K") else f"{value:.1f}{unit}"
        value /= 1024
    return f"{n}B"


def fmt_start(t: float | None) -> str:
    """Start time in local time: ``2026-11-23 19:14``."""
    if not t:
        return "-"
    return datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M")


def fmt_clock(seconds: float | None) -> str:
    """``1:02:03`` / ``2:03`` for ETAs and elapsed times."""
    if seconds is None or seconds != seconds or seconds < 0:
        return "-"
    s = round(seconds)
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def display_path(path: str | Path | None, workspace: str | Path) -> str:
    """A path inside the workspace relative to it (``runs/<id>/...``), others as they are."""
    if not path:
        return "-"
    try:
        return str(Path(path).relative_to(Path(workspace).resolve()))
    except ValueError:
        try:
            return str(Path(path).relative_to(Path(workspace)))
        except ValueError:
            return str(path)


def run_label(run: dict[str, Any]) -> str:
    """``name (id)`` for titles and confirmations."""
    return f"{run.get('name') or '-'} ({run['id']})"


class HistoryReader:
    """The history database of a workspace for one screen's worker threads.

    One connection, opened on first use and used by one thread at a time (a lock), so a
    superseded worker that is still finishing its query never shares it with the next one.
    Until a first run creates the database, :meth:`db` yields None rather than creating it:
    the TUI only reads.
    """

    def __init__(self, workspace: str | Path):
        self.workspace = Path(workspace)
        self.path = db_path(self.workspace)
        self._db: history.HistoryDB | None = None
        self._lock = threading.Lock()

    @contextmanager
    def db(self) -> Iterator[history.HistoryDB | None]:
        with self._lock:
            if self._db is None:
                if not self.path.exists():
                    yield None
                    return
                self._db = history.open_db(self.path)
            yield self._db

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None
