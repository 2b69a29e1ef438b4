"""The profile: schema, every-error-at-once validation, overrides, paths and the CLI verbs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from engine.profile import ProfileError, load_profile
from tests.conftest import PROFILES, REPO, tiny_profile, write_jsonl, zerotune

SHIPPED = sorted(PROFILES.glob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_every_shipped_profile_validates(path: Path) -> None:
    r = zerotune("profile", "validate", str(path))
    assert r.returncode == 0, r.stderr
    assert "valid" in r.stdout


def test_shipped_profiles_cover_every_method() -> None:
    kinds = {yaml.safe_load(p.read_text())["method"]["kind"] for p in SHIPPED}
    assert kinds == {"cpt", "sft", "dpo"}


def _edit(path: Path, **changes) -> Path:
    data = yaml.safe_load(path.read_text())
    for dotted, value in changes.items():
        node = data
        keys = dotted.split("__")
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = value
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_unknown_key_gets_line_and_did_you_mean(tmp_path: Path) -> None:
    path = tiny_profile(tmp_path)
    text = path.read_text().replace("  zero_stage: 2", "  zero_stag: 2")
    path.write_text(text)
    line = next(i for i, text_line in enumerate(text.splitlines(), 1) if "zero_stag:" in text_line)
    r = zerotune("profile", "validate", str(path))
    assert r.returncode == 2
    assert f"{path}:{line}: deepspeed.zero_stag: unknown key; did you mean 'zero_stage'?" in r.stderr
    assert "Traceback" not in r.stderr


def test_all_errors_reported_at_once(tmp_path: Path) -> None:
    path = tiny_profile(tmp_path)
    _edit(path, training__lr="fast", training__micro_batch_size=0, deepspeed__offload_param="cpu",
          methodd={"kind": "sft"})
    r = zerotune("profile", "validate", str(path))
    assert r.returncode == 2
    err = r.stderr
    assert "training.lr: expected a number, got 'fast'" in err
    assert "training.micro_batch_size:" in err and "greater than or equal to 1" in err
    assert "methodd: unknown key; did you mean 'method'?" in err
    assert "problems" in err.splitlines()[0]


def test_impossible_combination_param_offload_below_stage3(tmp_path: Path) -> None:
    path = _edit(tiny_profile(tmp_path), deepspeed__offload_param="cpu")
    r = zerotune("profile", "validate", str(path))
    assert r.returncode == 2
    assert "deepspeed.offload_param: offload_param: cpu needs zero_stage 3" in r.stderr
    ok = zerotune("profile", "validate", str(path), "--set", "deepspeed.zero_stage=3")
    assert ok.returncode == 0, ok.stderr


def test_dpo_needs_chosen_and_rejected(tmp_path: Path) -> None:
    path = tiny_profile(tmp_path, "sft")
    _edit(path, method__kind="dpo")
    r = zerotune("profile", "validate", str(path))
    assert r.returncode == 2
    assert "dpo cannot train on prompt_completion data" in r.stderr


def test_missing_columns_name_found_and_closest(tmp_path: Path) -> None:
    rows = [{"question": f"q{i}?", "answr": f"a{i}"} for i in range(10)]
    write_jsonl(tmp_path / "qa.jsonl", rows)
    path = tiny_profile(tmp_path, "sft")
    _edit(path, data__train="qa.jsonl", data__format="prompt_completion")
    r = zerotune("profile", "validate", str(path))
    assert r.returncode == 2
    assert "needs columns prompt, completion; found answr, question" in r.stderr
    assert "'answr' looks like" not in r.stderr or "completion" in r.stderr
    fixed = zerotune("profile", "validate", str(path), "--set", "data.columns={prompt: question, completion: answr}")
    assert fixed.returncode == 0, fixed.stderr


def test_missing_data_file(tmp_path: Path) -> None:
    path = _edit(tiny_profile(tmp_path), data__train="nope.jsonl")
    r = zerotune("profile", "validate", str(path))
    assert r.returncode == 2
    assert f"data.train: file not found: {tmp_path / 'nope.jsonl'}" in r.stderr


def test_malformed_jsonl_line_named(tmp_path: Path) -> None:
    path = tiny_profile(tmp_path)
    data = tmp_path / "cpt.jsonl"
    lines = data.read_text().splitlines()
    lines[4] = lines[4][: len(lines[4]) // 2]  # cut off mid-object
    data.write_text("\n".join(lines) + "\n")
    r = zerotune("profile", "validate", str(path))
    assert r.returncode == 2
    assert f"{data}:5: not valid JSON" in r.stderr
    assert "on_bad_rows: skip" in r.stderr
    skip = zerotune("profile", "validate", str(path), "--set", "data.on_bad_rows=skip")
    assert skip.returncode == 0, skip.stderr
    assert "1 bad row(s) will be skipped" in skip.stderr


def test_lora_target_module_the_model_lacks(tmp_path: Path) -> None:
    path = tiny_profile(tmp_path, "sft", method={"adapter": "lora", "lora": {"target_modules": ["q_proj", "c_attn"]}})
    r = zerotune("profile", "validate", str(path))
    assert r.returncode == 2
    assert "no module named 'c_attn'" in r.stderr and "q_proj" in r.stderr


def test_yaml_syntax_error_has_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\nmodel: {init: scratch\n")
    r = zerotune("profile", "validate", str(path))
    assert r.returncode == 2
    assert "not valid YAML" in r.stderr and "Traceback" not in r.stderr


def test_hardware_checks_wait_for_launch(tmp_path: Path) -> None:
    """QLoRA on a GPU server validates on a laptop; launching it here is refused with the reason."""
    path = tiny_profile(tmp_path, "sft", model={"init": "pretrained", "path": "meta-llama/Llama-3.1-8B", "config": None},
                        method={"adapter": "qlora"}, resources={"gpus_per_node": 8})
    assert zerotune("profile", "validate", str(path)).returncode == 0
    r = zerotune("--workspace", str(tmp_path), "run", str(path))
    assert r.returncode == 2
    assert "qlora" in r.stderr and "GPU" in r.stderr
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_show_makes_every_default_explicit(tmp_path: Path) -> None:
    path = tiny_profile(tmp_path)
    r = zerotune("profile", "show", str(path))
    assert r.returncode == 0, r.stderr
    shown = yaml.safe_load(r.stdout)
    assert shown["training"]["scheduler"] == "cosine"
    assert shown["deepspeed"]["offload_optimizer"] == "none"
    assert shown["resources"]["launcher"] == "deepspeed"
    assert shown["inference"]["mode"] == "none"
    # The shown profile is itself a valid profile with the same content.
    again = tmp_path / "again.yaml"
    again.write_text(r.stdout)
    assert load_profile(again).profile == load_profile(path).profile


def test_set_overrides_apply_and_type_check(tmp_path: Path) -> None:
    path = tiny_profile(tmp_path)
    lp = load_profile(path, ["training.lr=3e-4", "deepspeed.zero_stage=3", "data.packing=false"])
    assert lp.profile.training.lr == pytest.approx(3e-4)
    assert lp.profile.deepspeed.zero_stage == 3 and lp.profile.data.packing is False
    with pytest.raises(ProfileError) as exc:
        load_profile(path, ["training.epochs=many"])
    assert "training.epochs: expected a number" in str(exc.value)


def test_relative_paths_follow_the_profile(tmp_path: Path) -> None:
    path = tiny_profile(tmp_path / "moved")
    r = zerotune("profile", "validate", str(path), cwd=REPO / "tests")
    assert r.returncode == 0, r.stderr


def test_dsconfig_fully_resolved(tmp_path: Path) -> None:
    path = tiny_profile(tmp_path, deepspeed={"zero_stage": 3, "offload_param": "cpu", "offload_optimizer": "cpu"})
    r = zerotune("profile", "dsconfig", str(path), "--gpus", "2")
    assert r.returncode == 0, r.stderr
    cfg = json.loads(r.stdout)
    assert "auto" not in r.stdout
    assert cfg["train_batch_size"] == 2 * 1 * 2
    assert cfg["zero_optimization"]["stage"] == 3
    assert cfg["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert cfg["zero_optimization"]["reduce_bucket_size"] == 32 * 32


def test_command_is_the_deepspeed_launcher(tmp_path: Path) -> None:
    path = tiny_profile(tmp_path, resources={"gpus_per_node": 2, "master_port": 29611})
    r = zerotune("profile", "command", str(path), "--json")
    assert r.returncode == 0, r.stderr
    cmd = json.loads(r.stdout)
    argv = cmd["argv"]
    assert Path(argv[0]).name == "deepspeed"
    assert argv[argv.index("--num_gpus") + 1] == "2"
    assert argv[argv.index("--master_port") + 1] == "29611"
    assert argv[argv.index("--module") + 1] == "engine.train"
    torch = zerotune("profile", "command", str(path), "--set", "resources.launcher=torchrun")
    assert "torchrun" in torch.stdout and "--nproc_per_node=2" in torch.stdout


RUNNER_CMD = r"""
import json, subprocess, sys
from deepspeed.launcher import runner

real_popen = subprocess.Popen

class Recorded:  # stands in for the launch.py process the runner would start
    returncode = 0
    def __init__(self, cmd, env=None):
        print(json.dumps(cmd))
    def wait(self):
        return 0

def popen(cmd, *args, **kwargs):  # other calls (device probes) run for real
    if isinstance(cmd, list) and "deepspeed.launcher.launch" in cmd:
        return Recorded(cmd)
    return real_popen(cmd, *args, **kwargs)

subprocess.Popen = popen
runner.main(sys.argv[1:])
"""


def test_single_node_exec_argv_is_what_the_deepspeed_runner_starts(tmp_path: Path) -> None:
    """On one node zerotune starts deepspeed.launcher.launch itself, one process (and one
    DeepSpeed import) fewer; DeepSpeed's own runner, given the recorded command, starts the same
    launch.py command line. Without a hostfile (DeepSpeed's default /job/hostfile must not exist)."""
    import os
    import subprocess
    import sys

    if Path("/job/hostfile").exists():
        pytest.skip("/job/hostfile exists: deepspeed would launch from it")
    path = tiny_profile(tmp_path, resources={"gpus_per_node": 2, "master_port": 29612})
    r = zerotune("profile", "command", str(path), "--json")
    assert r.returncode == 0, r.stderr
    cmd = json.loads(r.stdout)
    assert cmd["exec_argv"][:4] == [sys.executable, "-u", "-m", "deepspeed.launcher.launch"]
    env = {**os.environ, **cmd["env"]}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    ds = subprocess.run([sys.executable, "-c", RUNNER_CMD, *cmd["argv"][1:]], capture_output=True,
                        text=True, env=env, cwd=REPO, timeout=120)
    assert ds.returncode == 0, ds.stderr[-2000:]
    started = json.loads(ds.stdout.strip().splitlines()[-1])
    drop = ("--enable_each_rank_log=None",)  # the launcher's default spelled out by the runner
    assert [a for a in started if a not in drop] == cmd["exec_argv"]
    # torchrun runs as it is written (multi-node: test_multinode_no_ssh_command).
    r = zerotune("profile", "command", str(path), "--json", "--set", "resources.launcher=torchrun")
    t = json.loads(r.stdout)
    assert t["exec_argv"] == t["argv"]


def test_multinode_no_ssh_command(tmp_path: Path) -> None:
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")
    path = tiny_profile(tmp_path, resources={"num_nodes": 2, "gpus_per_node": 1, "hostfile": "hostfile",
                                             "no_ssh": True, "master_addr": "10.0.0.1"})
    r = zerotune("profile", "command", str(path), "--node-rank", "1", "--json")
    argv = json.loads(r.stdout)["argv"]
    assert argv[argv.index("--hostfile") + 1] == str(hostfile)
    assert "--no_ssh" in argv and argv[argv.index("--node_rank") + 1] == "1"
    assert argv[argv.index("--num_nodes") + 1] == "2"
    assert json.loads(r.stdout)["exec_argv"] == argv  # multi-node runs the deepspeed command as written


def test_dsconfig_accepted_by_deepspeed_initialize(tmp_path: Path) -> None:
    """The generated JSON goes through deepspeed.initialize unchanged (each stage)."""
    import subprocess
    import sys

    script = tmp_path / "init.py"
    script.write_text(
        "import json, sys, torch, deepspeed\n"
        "deepspeed.init_distributed(dist_backend='gloo')\n"
        "for path in sys.argv[1:]:\n"
        "    cfg = json.load(open(path))\n"
        "    model = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.Linear(32, 4))\n"
        "    engine, opt, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)\n"
        "    x = torch.randn(cfg['train_micro_batch_size_per_gpu'], 32)\n"
        "    loss = engine(x).pow(2).mean(); engine.backward(loss); engine.step()\n"
        "    print('ok', cfg['zero_optimization']['stage'], type(opt).__name__, flush=True)\n"
    )
    paths = []
    for stage, extra in ((0, []), (1, []), (2, ["--set", "deepspeed.offload_optimizer=cpu"]), (3, [])):
        prof = tiny_profile(tmp_path, name=f"s{stage}", deepspeed={"zero_stage": stage})
        r = zerotune("profile", "dsconfig", str(prof), *extra)
        assert r.returncode == 0, r.stderr
        out = tmp_path / f"ds{stage}.json"
        out.write_text(r.stdout)
        paths.append(str(out))
    env = {"DS_ACCELERATOR": "cpu", "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29633", "PATH": "/usr/bin:/bin"}
    r = subprocess.run([sys.executable, str(script), *paths], capture_output=True, text=True,
                       timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert [line.split()[1] for line in r.stdout.splitlines() if line.startswith("ok")] == ["0", "1", "2", "3"]
