"""Evaluation after training: the metrics on hand-worked examples, then on tiny models."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from engine import evaluate as ev
from tests.conftest import read_events, tiny_profile


def test_exact_match_and_token_f1_by_hand() -> None:
    # SQuAD normalisation: case, punctuation and articles do not count.
    assert ev.normalize("The Cat, sat on a mat!") == "cat sat on mat"
    assert ev.exact_match("The cat sat on the mat.", "the cat sat on the mat") == 1.0
    assert ev.exact_match("hello world", "goodbye world") == 0.0
    # common {world}: precision 1/2, recall 1/2 -> F1 1/2
    assert ev.token_f1("hello world", "goodbye world") == 0.5
    # pred {use, parameterized, queries} vs ref {always, use, parameterized, sql, queries}:
    # 3 common; P = 3/3, R = 3/5 -> F1 = 2 * 1 * 0.6 / 1.6 = 0.75
    assert ev.token_f1("use parameterized queries", "always use parameterized SQL queries") == pytest.approx(0.75)
    assert ev.token_f1("", "") == 1.0 and ev.token_f1("x", "") == 0.0


def test_rouge_l_and_bleu_by_hand() -> None:
    # LCS("hello world", "goodbye world") = 1 token: P = R = 1/2 -> F = 1/2; identical -> 1.
    assert ev.rouge_l(["hello world", "the cat sat"], ["goodbye world", "the cat sat"]) == pytest.approx(0.75)
    # Same length (brevity penalty 1); n-gram precisions 4/5, 3/4, 2/3, 1/2:
    # BLEU = 100 * (0.8 * 0.75 * 2/3 * 0.5) ** (1/4) = 100 * 0.2 ** 0.25 = 66.874
    assert ev.bleu(["a b c d e"], ["a b c d f"]) == pytest.approx(100 * 0.2 ** 0.25, abs=1e-3)
    assert ev.bleu(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(100.0)
    m = ev.text_metrics(["The cat sat on the mat.", "hello world"], ["the cat sat on the mat", "goodbye world"])
    assert m["exact_match"] == 0.5 and m["token_f1"] == 0.75
    assert m["rouge_l"] == pytest.approx(0.75)


def test_comparison_rows_have_deltas() -> None:
    rows = ev.comparison({"perplexity": 10.0, "exact_match": 0.5}, {"perplexity": 40.0, "exact_match": 0.25})
    by = {r["name"]: r for r in rows}
    assert by["perplexity"]["delta"] == -30.0 and by["perplexity"]["higher_is_better"] is False
    assert by["exact_match"]["delta"] == 0.25
    assert ev.comparison({"bleu": 1.0}, None)[0]["base"] is None


def test_run_output_shows_the_heldout_evaluation_once_not_as_another_eval_loss() -> None:
    import io

    from engine.attach import Progress

    out = io.StringIO()
    progress = Progress(out, tty=False)
    progress.feed({"event": "eval", "t": 1.0, "step": 200, "eval_loss": 6.19, "perplexity": 487.6})
    table = ev.comparison({"perplexity": 487.6, "exact_match": 0.25}, {"perplexity": 4136.3, "exact_match": 0.0})
    progress.feed({"event": "eval", "t": 2.0, "step": 200, "stage": "evaluation", "heldout_rows": 40,
                   "eval_loss": 6.19, "perplexity": 487.6, "evaluation": table})
    lines = out.getvalue().splitlines()
    assert lines[0] == "step 200: eval loss 6.1900, perplexity 487.60"
    assert lines[1] == "held-out evaluation, 40 rows scored one by one: perplexity 4136.30 -> 487.60, exact_match 0.0000 -> 0.2500"
    assert len(lines) == 2


class _State:
    def __init__(self) -> None:
        self.global_step = 10
        self.log_history = [{"eval_loss": 2.0, "step": 10}]


class _Trainer:
    def __init__(self) -> None:
        self.state = _State()


def test_a_trained_model_beats_its_untrained_start(tmp_path: Path) -> None:
    """A tiny SFT run, then evaluate_after_training on it with the baseline: tuned vs base."""
    from engine.events import EventWriter
    from engine.train import load_run_profile, load_splits
    from tests.test_train import check_completed_run, run_profile

    profile = tiny_profile(tmp_path, "sft", data={"max_seq_len": 256}, data_rows=60,
                           training={"max_steps": 12, "lr": 3.0e-3, "eval_every": 12, "save_every": 12,
                                     "eval_max_rows": 4},
                           inference={"max_new_tokens": 8}, evaluation={"baseline": True})
    ws, r = run_profile(tmp_path, profile)
    run, _ = check_completed_run(ws, r)
    run_dir = Path(run["run_dir"])
    p = load_run_profile(run_dir).profile
    _, _, val, _ = load_splits(p, run_dir)
    events = EventWriter(run_dir / "events.jsonl")
    out = ev.evaluate_after_training(_Trainer(), p, run_dir, val, events)
    assert out["heldout_rows"] == len(val) == 4
    assert out["heldout_perplexity"] < out["base_perplexity"]  # fine-tuning helped
    for name in ev.TEXT_METRICS:
        assert 0 <= out[name] <= (100 if name == "bleu" else 1)
        assert f"base_{name}" in out
    assert out["eval_loss"] == 2.0  # the trainer's last eval loss, repeated
    table = {row["name"]: row for row in out["evaluation"]}
    assert table["perplexity"]["delta"] == pytest.approx(out["heldout_perplexity"] - out["base_perplexity"])
    last = read_events(run_dir)[-1]
    assert last["event"] == "eval" and last["stage"] == "evaluation"
    assert math.isfinite(last["heldout_perplexity"])
    json.dumps(last)
    # Recorded as the supervisor records a live run's events, runs show prints base vs tuned.
    from engine import history
    from engine.workspace import db_path
    from tests.conftest import zerotune

    db = history.open_db(db_path(ws))
    try:
        rec = history.RunRecorder(db, run["id"])
        rec.add_events([last])
        rec.flush()
        assert history.metric_summary(db, run["id"])["base_perplexity"]["last"] == out["base_perplexity"]
    finally:
        db.close()
    shown = zerotune("--workspace", str(ws), "runs", "show", run["id"])
    assert shown.returncode == 0, shown.stderr
    assert "evaluation on 4 held-out rows" in shown.stdout
    section = shown.stdout.split("evaluation on 4 held-out rows", 1)[1]
    line = next(x for x in section.splitlines() if x.startswith("perplexity "))
    assert "better" in line
    assert yaml.safe_load((run_dir / "profile.yaml").read_text())["evaluation"]["baseline"] is True


def test_dpo_rewards_against_the_base_model(tmp_path: Path) -> None:
    """No TRL reward metrics logged: accuracy and margin are computed with the base as reference.
    The run's model is its base here, so every implicit reward margin is exactly 0."""
    import shutil

    from engine.profile import validate_profile
    from tests.conftest import sample_rows, write_jsonl
    from tests.test_infer import build_tiny_model

    base = build_tiny_model(tmp_path / "base")
    run_dir = tmp_path / "run"
    shutil.copytree(base, run_dir / "model")
    data = write_jsonl(tmp_path / "dpo.jsonl", sample_rows("dpo", 6))
    raw = {"name": "dpo-eval", "model": {"path": str(base)}, "data": {"train": str(data), "max_seq_len": 96},
           "method": {"kind": "dpo"}, "evaluation": {"baseline": True}}
    (run_dir / "profile.yaml").write_text(yaml.safe_dump(raw))
    p = validate_profile(raw, check_data=False, check_model=False).profile
    trainer = _Trainer()
    trainer.state.log_history = []
    out = ev.evaluate_after_training(trainer, p, run_dir, sample_rows("dpo", 3), None)
    assert out["reward_accuracy"] == 0.0 and out["reward_margin"] == pytest.approx(0.0, abs=1e-9)
    assert out["heldout_perplexity"] == pytest.approx(out["base_perplexity"])
    assert "eval_loss" in out and "exact_match" not in out
    trainer.state.log_history = [{"eval_rewards/accuracies": 0.75, "eval_rewards/margins": 0.2, "eval_loss": 0.6}]
    out = ev.evaluate_after_training(trainer, p, run_dir, sample_rows("dpo", 3), None)
    assert (out["reward_accuracy"], out["reward_margin"], out["eval_loss"]) == (0.75, 0.2, 0.6)
