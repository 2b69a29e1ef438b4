"""Starting the CLI never loads the heavy libraries (they belong to the engine process)."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import REPO

HEAVY = ("torch", "deepspeed", "transformers", "trl", "datasets", "peft", "accelerate")

PROBE = """
import json, sys
sys.argv = ["zerotune"] + {args!r}
from engine import cli
try:
    cli.main(sys.argv[1:])
except SystemExit:
    pass
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in {heavy!r})), file=sys.stderr)
"""


def heavy_modules_after(*args: str) -> list[str]:
    code = PROBE.format(args=list(args), heavy=list(HEAVY))
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                       timeout=120, stdin=subprocess.DEVNULL)
    return json.loads(r.stderr.strip().splitlines()[-1])


def test_help_loads_nothing_heavy() -> None:
    assert heavy_modules_after("--help") == []


def test_profile_commands_load_nothing_heavy() -> None:
    demo = str(REPO / "profiles" / "demo.yaml")
    for verb in ("validate", "show", "dsconfig", "command"):
        assert heavy_modules_after("profile", verb, demo) == [], verb


def test_the_probe_can_see_a_heavy_import() -> None:
    """The probe itself works: a command that does import torch is caught."""
    code = PROBE.replace("from engine import cli", "import torch\nfrom engine import cli").format(
        args=["--help"], heavy=list(HEAVY))
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert "torch" in json.loads(r.stderr.strip().splitlines()[-1])
