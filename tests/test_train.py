"""End to end: `zerotune run` of tiny models through the real DeepSpeed launcher on CPU.

Every case goes through the CLI as a subprocess, the detached supervisor, the launcher, the
engine, SQLite and the run directory. CI runs one case per method and one per ZeRO stage; the
full method x stage matrix is marked slow (ZEROTUNE_SLOW=1).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from engine import history
from engine.workspace import db_path
from tests.conftest import read_events, tiny_profile, zerotune

RUN_FILES = ("profile.yaml", "ds_config.json", "command.txt", "environment.json", "launch.json",
             "events.jsonl", "engine.log")
# One per method and one per stage; cpt at ZeRO-2 is the shipped demo profile (test_shipped_profiles).
FAST = {("cpt", 0), ("sft", 1), ("dpo", 3), ("chat", 2)}
MATRIX = [(k, s) for k in ("cpt", "sft", "chat", "dpo") for s in (0, 1, 2, 3)]


def run_profile(tmp_path: Path, profile: Path, *extra: str, timeout: float = 600):
    ws = tmp_path / "ws"
    r = zerotune("--workspace", str(ws), "run", str(profile), *extra, timeout=timeout)
    return ws, r


def the_run(ws: Path, run_id: str | None = None) -> dict:
    db = history.open_db(db_path(ws))
    try:
        runs = history.list_runs(db)
        return history.get_run(db, run_id) if run_id else runs[0]
    finally:
        db.close()


def check_completed_run(ws: Path, r) -> tuple[dict, list[dict]]:
    assert r.returncode == 0, r.stdout + r.stderr
    run = the_run(ws)
    assert run["status"] == "completed", run
    run_dir = Path(run["run_dir"])
    for name in RUN_FILES:
        assert (run_dir / name).exists(), name
    assert any((run_dir / "checkpoints").glob("checkpoint-*"))
    assert (run_dir / "model" / "config.json").exists() or (run_dir / "model" / "adapter_config.json").exists()
    events = read_events(run_dir)
    kinds = [e["event"] for e in events if e["event"] != "warning"]
    assert kinds[0] == "start" and kinds[-1] == "done"
    assert {"step", "eval", "checkpoint"} <= set(kinds)
    # The summary printed on stdout names the run and its directory.
    assert run["id"] in r.stdout and str(run_dir) in r.stdout
    return run, events


def eval_losses(events: list[dict]) -> list[float]:
    return [e["eval_loss"] for e in events if e["event"] == "eval"]


def step_losses(events: list[dict]) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in events if e["event"] == "step"}


@pytest.mark.parametrize(
    "kind,stage",
    [pytest.param(k, s, marks=() if (k, s) in FAST else pytest.mark.slow, id=f"{k}-zero{s}")
     for k, s in MATRIX],
)
def test_method_and_stage(tmp_path: Path, kind: str, stage: int) -> None:
    profile = tiny_profile(tmp_path, kind, deepspeed={"zero_stage": stage},
                           data={"max_seq_len": 256 if kind == "chat" else 64},
                           training={"max_steps": 10, "lr": 3.0e-3, "eval_every": 5, "save_every": 5})
    ws, r = run_profile(tmp_path, profile)
    run, events = check_completed_run(ws, r)
    start = events[0]
    assert start["zero_stage"] == stage and start["world_size"] == 1
    assert start["ds_config"]["zero_optimization"]["stage"] == stage
    losses = eval_losses(events)
    assert len(losses) >= 2, losses
    if kind == "dpo":
        # Held-out preference loss of a tiny random model is noise; the training loss must fall
        # from log(2), where the policy equals its reference.
        train = list(step_losses(events).values())
        assert train[0] == pytest.approx(0.6931, abs=1e-3) and sum(train[-3:]) / 3 < train[0], train
    else:
        assert losses[-1] < losses[0], losses  # eval before training, then lower
    # The run row holds the final numbers; metrics and device samples were recorded.
    assert run["last_step"] == 10 and run["final_eval_loss"] == pytest.approx(losses[-1])
    db = history.open_db(db_path(ws))
    try:
        assert [s for s, _ in history.run_metrics(db, run["id"], names=["loss"])["loss"]] == list(range(1, 11))
        assert history.device_samples(db, run["id"]), "no device sample recorded"
    finally:
        db.close()
    env = json.loads((Path(run["run_dir"]) / "environment.json").read_text())
    assert env["versions"]["deepspeed"] and env["versions"]["torch"]
    (data_file, digest), = env["data_files"].items()
    import hashlib

    assert hashlib.sha256(Path(data_file).read_bytes()).hexdigest() == digest


def test_seed_makes_a_cpu_run_repeatable(tmp_path: Path) -> None:
    profile = tiny_profile(tmp_path, "cpt", training={"max_steps": 8, "eval_every": 100})
    ws, r1 = run_profile(tmp_path, profile)
    assert r1.returncode == 0, r1.stderr
    _, r2 = run_profile(tmp_path, profile)
    assert r2.returncode == 0, r2.stderr
    db = history.open_db(db_path(ws))
    try:
        a, b = history.list_runs(db)
    finally:
        db.close()
    la = step_losses(read_events(Path(a["run_dir"])))
    lb = step_losses(read_events(Path(b["run_dir"])))
    assert len(la) == 8 and la == lb
    changed = tiny_profile(tmp_path / "other", "cpt", training={"max_steps": 8, "eval_every": 100})
    _, r3 = run_profile(tmp_path, changed, "--set", "seed=8")
    assert r3.returncode == 0
    c = the_run(tmp_path / "ws")
    assert step_losses(read_events(Path(c["run_dir"]))) != la


def test_two_cpu_ranks(tmp_path: Path) -> None:
    profile = tiny_profile(tmp_path, "sft", resources={"gpus_per_node": 2},
                           training={"max_steps": 6, "lr": 3.0e-3}, deepspeed={"zero_stage": 2})
    ws, r = run_profile(tmp_path, profile)
    run, events = check_completed_run(ws, r)
    assert events[0]["world_size"] == 2
    assert run["world_size"] == 2
    assert json.loads((Path(run["run_dir"]) / "ds_config.json").read_text())["train_batch_size"] == 2 * 2


def test_lora_with_cpu_optimizer_offload(tmp_path: Path) -> None:
    profile = tiny_profile(tmp_path, "sft", method={"adapter": "lora", "merge_adapter": True,
                                                    "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}},
                           deepspeed={"zero_stage": 2, "offload_optimizer": "cpu"},
                           training={"max_steps": 6, "lr": 1.0e-2})
    ws, r = run_profile(tmp_path, profile)
    run, events = check_completed_run(ws, r)
    model_dir = Path(run["run_dir"]) / "model"
    adapter = json.loads((model_dir / "adapter_config.json").read_text())
    assert sorted(adapter["target_modules"]) == ["q_proj", "v_proj"] and adapter["r"] == 4
    assert (model_dir / "merged" / "config.json").exists()
    start = events[0]
    assert start["ds_config"]["zero_optimization"]["offload_optimizer"]["device"] == "cpu"


def wait_for(predicate, timeout: float = 120, what: str = "condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}")


def test_sigterm_checkpoints_and_resume_matches_uninterrupted(tmp_path: Path) -> None:
    """Stop a run with SIGTERM mid-way, resume it, and compare with an uninterrupted run."""
    slow_model = {"model_type": "llama", "hidden_size": 128, "intermediate_size": 256,
                  "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
                  "max_position_embeddings": 256}
    profile = tiny_profile(tmp_path, "cpt", data_rows=300,
                           model={"config": slow_model, "tokenizer_vocab_size": 512},
                           data={"max_seq_len": 128, "validation_split": 0.0},
                           training={"max_steps": 30, "micro_batch_size": 4, "save_every": 1000,
                                     "eval_every": 1000, "warmup_ratio": 0.0})
    ws = tmp_path / "ws"
    r = zerotune("--workspace", str(ws), "run", str(profile), "--detach")
    assert r.returncode == 0, r.stderr
    run_id = r.stdout.strip()
    run_dir = ws / "runs" / run_id
    wait_for(lambda: any(e["event"] == "step" and e["step"] >= 3 for e in read_events(run_dir))
             if (run_dir / "events.jsonl").exists() else False, what="step 3")
    stop = zerotune("--workspace", str(ws), "runs", "stop", run_id)
    assert stop.returncode == 0, stop.stderr
    run = wait_for(lambda: (lambda x: x if x["recorded_status"] not in history.ACTIVE_STATUSES else None)(the_run(ws, run_id)),
                   what="the run to end")
    assert run["status"] == "stopped", run
    events = read_events(run_dir)
    stopped = [e for e in events if e["event"] == "stopped"]
    assert stopped and stopped[0]["checkpoint"], events[-3:]
    stop_step = stopped[0]["step"]
    assert 3 <= stop_step < 30
    assert Path(stopped[0]["checkpoint"]).is_dir()

    resumed = zerotune("--workspace", str(ws), "runs", "resume", run_id)
    assert resumed.returncode == 0, resumed.stderr
    child_id = resumed.stdout.strip().split()[-1]
    child = wait_for(lambda: (lambda x: x if x["recorded_status"] not in history.ACTIVE_STATUSES else None)(the_run(ws, child_id)),
                     timeout=300, what="the resumed run")
    assert child["status"] == "completed", child
    assert child["parent_run_id"] == run_id and child["relation"] == "resume"
    child_events = read_events(Path(child["run_dir"]))
    assert child_events[0]["start_step"] == stop_step
    resumed_losses = step_losses(child_events)
    assert min(resumed_losses) == stop_step + 1 and max(resumed_losses) == 30

    ws2 = tmp_path / "ws2"
    full = zerotune("--workspace", str(ws2), "run", str(profile))
    assert full.returncode == 0, full.stderr
    full_losses = step_losses(read_events(Path(the_run(ws2)["run_dir"])))
    for step in (stop_step + 1, 30):
        assert resumed_losses[step] == pytest.approx(full_losses[step], rel=1e-3), step
    before = step_losses(events)
    for step in range(1, stop_step + 1):
        assert before[step] == pytest.approx(full_losses[step], rel=1e-5)


def test_two_nodes_on_loopback_train_as_one_world(tmp_path: Path) -> None:
    """Two launchers with --no_ssh, one CPU rank each, joined through 127.0.0.1."""
    import socket
    import subprocess
    import sys

    from tests.conftest import REPO

    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    profile = tiny_profile(tmp_path, "cpt", resources={
        "num_nodes": 2, "gpus_per_node": 1, "hostfile": "hostfile", "no_ssh": True,
        "master_addr": "127.0.0.1", "master_port": port}, training={"max_steps": 6})
    import os

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [
        subprocess.Popen([sys.executable, "-m", "engine.cli", "--workspace", str(tmp_path / f"node{rank}"),
                          "run", str(profile), "--node-rank", str(rank), "--run-id", "twonodes"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                         stdin=subprocess.DEVNULL)
        for rank in (0, 1)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, out + err
    events = read_events(tmp_path / "node0" / "runs" / "twonodes")
    start = events[0]
    assert start["world_size"] == 2
    assert start["ds_config"]["train_batch_size"] == 2 * 2
    assert events[-1]["event"] == "done"
    # Node 1 records the same run as it saw it: global rank 1 of the same world of 2.
    events1 = read_events(tmp_path / "node1" / "runs" / "twonodes")
    assert events1[0]["world_size"] == 2 and events1[0]["rank"] == 1
    assert step_losses(events1) == step_losses(events)


def test_engine_failure_is_recorded_with_reason(tmp_path: Path) -> None:
    """A profile that validates but cannot train (no full sequence) fails with a reason."""
    from tests.conftest import write_jsonl

    profile = tiny_profile(tmp_path, "cpt", data={"max_seq_len": 64, "validation_split": 0.0},
                           training={"max_steps": 4})
    write_jsonl(tmp_path / "cpt.jsonl", [{"text": f"a short note {i}"} for i in range(4)])
    ws, r = run_profile(tmp_path, profile)
    assert r.returncode == 1
    run = the_run(ws)
    assert run["status"] == "failed"
    assert "no full sequence" in (run["reason"] or ""), run["reason"]
    assert "no full sequence" in r.stdout


def test_cpt_without_packing_pads_and_learns_to_end_documents(tmp_path: Path) -> None:
    profile = tiny_profile(tmp_path, "cpt", data={"packing": False},
                           training={"max_steps": 8, "lr": 3.0e-3, "eval_every": 4})
    ws, r = run_profile(tmp_path, profile)
    _, events = check_completed_run(ws, r)
    losses = eval_losses(events)
    assert losses[-1] < losses[0]
    assert events[0]["train_rows"] == 108


def test_run_warns_before_launch_when_the_estimate_says_it_will_not_fit(tmp_path: Path) -> None:
    """The warning comes before anything starts, and the estimate is kept for the history."""
    from engine.profile import load_profile
    from engine.runner import prepare_run

    profile = tiny_profile(tmp_path, "cpt")
    tight = prepare_run(load_profile(profile, ["resources.host_memory_gb=0.01"]), tmp_path / "runs")
    assert any(w.startswith("memory: needs") and "host RAM" in w for w in tight.warnings), tight.warnings
    roomy = prepare_run(load_profile(profile), tmp_path / "runs")
    assert not any(w.startswith("memory:") for w in roomy.warnings)
    launch = json.loads((roomy.run_dir / "launch.json").read_text())
    assert launch["estimate"]["gpu_peak_bytes"] > 0 and launch["estimate"]["fits"] is True


def test_inference_stage_after_training_is_recorded(tmp_path: Path) -> None:
    from tests.conftest import write_jsonl

    write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"How should passwords be stored? ({i})"} for i in range(3)])
    profile = tiny_profile(tmp_path, "sft", training={"max_steps": 4},
                           inference={"mode": "zero", "prompts": "prompts.jsonl", "max_new_tokens": 4,
                                      "batch_size": 2})
    ws, r = run_profile(tmp_path, profile)
    run, events = check_completed_run(ws, r)
    gens = [json.loads(x) for x in (Path(run["run_dir"]) / "generations.jsonl").read_text().split("\n") if x]
    assert [g["prompt"] for g in gens] == [f"How should passwords be stored? ({i})" for i in range(3)]
    infer = [e for e in events if e["event"] == "infer"]
    assert infer and infer[0]["mode"] == "zero"
    db = history.open_db(db_path(ws))
    try:
        metrics = history.run_metrics(db, run["id"], names=["infer_tokens_per_s", "tokens_per_s"])
    finally:
        db.close()
    assert metrics["infer_tokens_per_s"][0][1] > 0
    assert len(metrics["tokens_per_s"]) == 4  # training throughput stays apart from inference's


def test_the_engine_trains_on_prepared_data(tmp_path: Path) -> None:
    """data.prep is applied before launch; the ranks train on its output, and the run keeps its
    fingerprint (input bytes + prep settings)."""
    from tests.conftest import sample_rows, write_jsonl

    rows = sample_rows("sft", 60)
    rows[3] = {"prompt": "Who runs the audit?", "completion": "Write to audit.lead@example.com for the report."}
    write_jsonl(tmp_path / "sft.jsonl", rows + rows[:20])  # 20 exact duplicates
    profile = tiny_profile(tmp_path, "sft", data_rows=0, training={"max_steps": 4},
                           data={"prep": {"dedup": True, "scrub_pii": True}})
    write_jsonl(tmp_path / "sft.jsonl", rows + rows[:20])
    ws, r = run_profile(tmp_path, profile)
    run, events = check_completed_run(ws, r)
    start = events[0]
    assert start["train_rows"] + start["eval_rows"] == 60
    env = json.loads((Path(run["run_dir"]) / "environment.json").read_text())
    assert env["data_prep"]["steps"]["dedup"]["removed"] == 20
    assert env["data_prep"]["steps"]["pii"]["changed"] >= 1
    cached = Path(env["data_prep"]["cache"])
    text = (cached / "train.jsonl").read_text() + (cached / "validation.jsonl").read_text()
    assert "audit.lead@example.com" not in text and "EMAIL" in text
    assert run["data_fingerprint"] == env["data_fingerprint"]
    # Other prep settings on the same bytes: another fingerprint.
    _, r2 = run_profile(tmp_path, profile, "--set", "data.prep.scrub_pii=false")
    assert r2.returncode == 0, r2.stderr
    fps = {json.loads((Path(x["run_dir"]) / "environment.json").read_text())["data_fingerprint"]
           for x in history.list_runs(history.open_db(db_path(ws)))}
    assert len(fps) == 2
