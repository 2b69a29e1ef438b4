"""The TUI never loads the heavy libraries: not when imported, and not after every wizard step
has done its background work (estimates, data report, review with DeepSpeed JSON)."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import REPO

HEAVY = ("torch", "deepspeed", "transformers", "trl", "datasets")


def heavy_after(code: str) -> list[str]:
    probe = code + (
        "\nimport json, sys\n"
        f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {list(HEAVY)!r})),"
        " file=sys.stderr)\n"
    )
    r = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True,
                       timeout=300, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stderr.strip().splitlines()[-1])


def test_importing_the_tui_loads_nothing_heavy() -> None:
    assert heavy_after("import tui.app") == []


WALK = """
import asyncio, shutil, sys, tempfile, time
from pathlib import Path
from tui.app import ZerotuneApp

async def main():
    ws = Path(tempfile.mkdtemp()) / "ws"
    shutil.copytree("profiles", ws / "profiles")
    app = ZerotuneApp(ws, blink_cursor=False)
    async with app.run_test(size=(80, 24)) as pilot:
        async def settle():
            for _ in range(2000):
                if not [w for w in app.workers if w.group != "_loader" and not w.is_finished]:
                    break
                await asyncio.sleep(0.02)
            await pilot.pause()
        await settle()
        assert app.open_profile_in_wizard(ws / "profiles" / "demo-lora.yaml")
        await settle()
        for i in range(7):
            app.wizard.show_step(i)
            await pilot.pause(0.3)
            await settle()
        review = app.wizard.step("review")
        assert review.review is not None and review.review.ds_json, "review did not finish"
        assert app.wizard.step("memory").plan is not None, "no estimate"
        await pilot.press("escape")
        await settle()

asyncio.run(main())
"""


def test_every_wizard_step_loads_nothing_heavy() -> None:
    assert heavy_after(WALK) == []


def test_the_probe_sees_a_heavy_import() -> None:
    assert "datasets" in heavy_after("import tui.app\nimport datasets")
