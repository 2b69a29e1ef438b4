"""The history screen at scale: 10,000 runs and 5 million metric rows.

    .venv/bin/python bench/tui_history.py [--runs 10000] [--steps 100] [--repeat 7]

Builds the database with the bulk loader of ``bench/history_scale.py``, then drives the real
``HistoryScreen`` headless (``App.run_test``) and prints, first and median of the repeats:

- open: from pushing the screen to its first page of runs drawn;
- filter: from one key press in the filter box to the filtered page drawn (as you type, so
  each key is one query), and the same for a status choice, a sort and the next page.

Each figure is wall time inside the UI process, query in the worker thread included, and is
printed beside its target (300 ms). The query alone (``page_runs`` in the worker) is printed
too, so a slow figure shows whether the database or the drawing is to blame.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from history_scale import build  # noqa: E402 - after the path set-up, like the other benches
from textual.app import App  # noqa: E402
from textual.widgets import Input, Select  # noqa: E402

from engine.workspace import db_path  # noqa: E402
from tui.screens.history import HistoryScreen  # noqa: E402

TARGET_MS = 300.0


class BenchApp(App):
    """Nothing but the screens the benchmark pushes."""


async def _until(pilot, condition: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise SystemExit("timed out waiting for the history screen")
        await asyncio.sleep(0.001)
    # The page is applied: wait until every widget has handled its messages, then paint the
    # screen (pause(0) does both; pause() would also wait for the machine to be idle, which
    # on a busy machine measures the other processes).
    await pilot.pause(0)


async def _timed(pilot, screen: HistoryScreen, act: Callable[[], Awaitable[None] | None],
                 done: Callable[[], bool]) -> tuple[float, float]:
    """(wall ms from the action to the page drawn, ms of the query in the worker)."""
    loads = screen.loads
    t = time.perf_counter()
    result = act()
    if result is not None:
        await result
    await _until(pilot, lambda: screen.loads > loads and done())
    return (time.perf_counter() - t) * 1000, screen.page.elapsed_ms


async def measure(ws: Path, repeat: int, size: tuple[int, int]) -> dict[str, list[tuple]]:
    results: dict[str, list[tuple[float, float]]] = {}
    app = BenchApp()
    async with app.run_test(size=size) as pilot:
        for _ in range(repeat):
            screen = HistoryScreen(ws)
            t = time.perf_counter()
            await app.push_screen(screen)
            await _until(pilot, lambda s=screen: s.loads > 0)
            results.setdefault("open the history screen", []).append(
                ((time.perf_counter() - t) * 1000, screen.page.elapsed_ms))
            first = screen.page.rows[0]["name"]
            if first not in app.export_screenshot():  # the figure is for a drawn page
                raise SystemExit(f"the first run ({first}) is not on the screen")

            filt = screen.query_one("#runs-filter", Input)
            filt.focus()
            await pilot.pause()
            typed = ""
            for ch in "legal":  # as you type: one query per key
                typed += ch
                results.setdefault("filter: one key typed (name)", []).append(await _timed(
                    pilot, screen, lambda c=ch: pilot.press(c),
                    lambda s=screen, want=typed: s.page.query.text == want))
            results.setdefault("filter: clear the text", []).append(await _timed(
                pilot, screen, lambda f=filt: setattr(f, "value", ""),
                lambda s=screen: s.page.query.text == ""))
            select = screen.query_one("#runs-status", Select)
            results.setdefault("filter: status failed", []).append(await _timed(
                pilot, screen, lambda sel=select: setattr(sel, "value", "failed"),
                lambda s=screen: s.page.query.status == "failed"))
            results.setdefault("filter: any status again", []).append(await _timed(
                pilot, screen, select.clear, lambda s=screen: s.page.query.status is None))
            screen.query_one("#runs-table").focus()
            results.setdefault("sort by best eval loss", []).append(await _timed(
                pilot, screen, lambda s=screen: s._requery(sort="best_eval_loss",
                                                           descending=False),
                lambda s=screen: s.page.query.sort == "best_eval_loss"))
            results.setdefault("next page (] key)", []).append(await _timed(
                pilot, screen, lambda: pilot.press("right_square_bracket"),
                lambda s=screen: s.page.query.offset > 0))
            app.pop_screen()
            await pilot.pause()
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10_000)
    parser.add_argument("--steps", type=int, default=100, help="steps per run (x5 metrics)")
    parser.add_argument("--repeat", type=int, default=7, help="repetitions of each action")
    parser.add_argument("--size", default="120x40", help="terminal size, WIDTHxHEIGHT")
    parser.add_argument("--workdir", help="reuse or keep the workspace here")
    args = parser.parse_args()
    width, height = (int(x) for x in args.size.lower().split("x"))

    tmp = None
    if args.workdir:
        ws = Path(args.workdir)
        ws.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="zerotune-bench-")
        ws = Path(tmp.name)
    try:
        print(f"history screen at scale: {args.runs:,} runs, "
              f"{args.runs * args.steps * 5:,} metric rows, terminal {width}x{height}")
        if db_path(ws).exists():
            print(f"  reusing {db_path(ws)}")
        else:
            _, build_s = build(ws, args.runs, args.steps)
            print(f"  built in {build_s:.1f} s")
        results = asyncio.run(measure(ws, args.repeat, (width, height)))
        load = os.getloadavg()[0]
        print(f"wall time to the page drawn, first / median of {args.repeat} "
              f"(query in the worker in brackets; load average {load:.1f} on "
              f"{os.cpu_count()} cores):")
        for label, samples in results.items():
            walls = [w for w, _ in samples]
            queries = [q for _, q in samples]
            median = statistics.median(walls)
            verdict = "ok" if median < TARGET_MS else "OVER"
            print(f"  {label:<32} {walls[0]:7.1f} / {median:7.1f} ms  "
                  f"[query {statistics.median(queries):6.1f} ms]  target < {TARGET_MS:g} ms  "
                  f"{verdict}")
    finally:
        if tmp is not None:
            tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
