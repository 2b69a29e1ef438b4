"""Every shipped profile runs through `zerotune run` and its loss falls.

CI runs each with fewer steps (the same model, data and ZeRO stage); the full-length runs are
marked slow. `make demo` runs profiles/demo.yaml in full.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import PROFILES, only_run_dir, read_events, zerotune

SHIPPED = sorted(PROFILES.glob("*.yaml"))


def _run(tmp_path: Path, profile: Path, *overrides: str) -> list[dict]:
    ws = tmp_path / "ws"
    args = [a for o in overrides for a in ("--set", o)]
    r = zerotune("--workspace", str(ws), "run", str(profile), *args, timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    run_dir = only_run_dir(ws)
    return read_events(run_dir)


def _assert_learns(events: list[dict], kind: str) -> None:
    steps = [e["loss"] for e in events if e["event"] == "step"]
    evals = [e["eval_loss"] for e in events if e["event"] == "eval"]
    assert events[-1]["event"] == "done"
    assert steps, "no step recorded"
    # Held-out loss before training vs after (for DPO: the preference loss from log 2).
    assert len(evals) >= 2 and evals[-1] < evals[0], (kind, evals)


# CI covers one shipped profile per method kind and the adapter; the other SFT ones are slow.
SHORT_IN_CI = {"demo", "demo-dpo", "demo-lora"}


@pytest.mark.parametrize("profile", [pytest.param(p, id=p.stem, marks=() if p.stem in SHORT_IN_CI
                                                  else pytest.mark.slow) for p in SHIPPED])
def test_shipped_profile_short(tmp_path: Path, profile: Path) -> None:
    import yaml

    kind = yaml.safe_load(profile.read_text())["method"]["kind"]
    events = _run(tmp_path, profile, "training.max_steps=16", "training.eval_every=16",
                  "training.save_every=16", "training.eval_max_rows=16")
    _assert_learns(events, kind)


@pytest.mark.slow
@pytest.mark.parametrize("profile", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_shipped_profile_full(tmp_path: Path, profile: Path) -> None:
    import yaml

    kind = yaml.safe_load(profile.read_text())["method"]["kind"]
    _assert_learns(_run(tmp_path, profile), kind)
