"""From a validated profile to a started run: freeze it into a run directory, generate the
DeepSpeed JSON and launcher command, check the hardware, and hand the run to its supervisor.

Run directory (``runs/<run-id>/``): profile.yaml (frozen, fully resolved), ds_config.json,
command.txt, launch.json (what the supervisor starts), environment.json (versions, host, git
commit, data fingerprints), events.jsonl, engine.log, checkpoints/, model/.
"""

from __future__ import annotations

import getpass
import json
import os
import platform
import secrets
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from engine.dsconfig import Placement, build_ds_config, resolve_placement
from engine.launcher import LaunchCommand, build_command
from engine.profile import LoadedProfile, Problem, ProfileError, resolved_paths

VERSIONED = ("python", "torch", "deepspeed", "transformers", "trl", "peft", "datasets",
             "accelerate", "tokenizers", "zerotune")


def new_run_id() -> str:
    """Time-ordered and unique: 8 hex digits of time plus 4 random ones."""
    return f"{int(time.time() * 16) & 0xFFFFFFFFF:09x}{secrets.token_hex(2)}"[-12:]


def data_fingerprints(lp: LoadedProfile) -> dict[str, str]:
    from engine.data_formats import data_files, is_hub_name
    from engine.data_prep import file_sha256

    d = lp.profile.data
    paths = d.train if isinstance(d.train, list) else [d.train]
    if d.validation:
        paths = [*paths, d.validation]
    out: dict[str, str] = {}
    for value in paths:
        if is_hub_name(value):
            continue  # fingerprinted by preparation from what it streams
        path = lp.resolve_path(value)
        if path is None or not path.exists():
            continue
        for f in data_files(path):
            out[str(f)] = file_sha256(f)
    return out


def prepare_data(lp: LoadedProfile, workspace: Path, prints: dict[str, str]):
    """Run the profile's data preparation (or find it in the cache) before anything launches,
    so bad data stops the run here with file, line and reason; the ranks then read the cache."""
    from engine.data_formats import DataError
    from engine.data_prep import PrepSettings, prepare

    try:
        return prepare(PrepSettings.from_profile(lp), workspace, file_hashes=prints)
    except DataError as exc:
        file = str(lp.source) if lp.source else None
        raise ProfileError([Problem("data.train", str(exc), file)], file) from None


def _version(dist: str) -> str | None:
    if dist == "python":
        return platform.python_version()
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def git_commit(path: Path) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def environment(lp: LoadedProfile, placement: Placement, prints: dict[str, str],
                prepared: Any) -> dict[str, Any]:
    from engine.hardware import local_gpus

    gpus = local_gpus()
    return {
        "versions": {k: _version(k) for k in VERSIONED},
        "host": socket.gethostname(),
        "user": getpass.getuser(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "gpus": list(gpus.names),
        "placement": placement.__dict__,
        "git_commit": git_commit(lp.base_dir),
        "profile_source": str(lp.source) if lp.source else None,
        "data_files": prints,
        # Input bytes + preparation settings: the same fingerprint means the same training data.
        "data_fingerprint": prepared.fingerprint,
        "data_prep": {"cache": str(prepared.directory), "format": prepared.report.format,
                      "rows_read": prepared.report.rows_read, "rows_bad": prepared.report.rows_bad,
                      "train_rows": prepared.report.train_rows,
                      "validation_rows": prepared.report.validation_rows,
                      "steps": {st.name: {"removed": st.removed, "changed": st.changed}
                                for st in prepared.report.steps if st.enabled}},
        "created_at": time.time(),
    }


# --------------------------------------------------------------------------------------------
# Hardware checks at launch (not at validation: a laptop may plan for a GPU server)
# --------------------------------------------------------------------------------------------


def preflight(lp: LoadedProfile, placement: Placement) -> tuple[list[Problem], list[str]]:
    """Problems that stop this launch on this machine, and warnings."""
    from engine.hardware import local_gpus

    p = lp.profile
    gpus = local_gpus()
    problems: list[Problem] = []
    warnings: list[str] = []
    if placement.device == "gpu" and gpus.count == 0:
        problems.append(Problem("resources.device", f"device: gpu, but this machine has no usable GPU ({gpus.reason}); "
                                "use device: auto or cpu"))
    if placement.device == "gpu" and p.resources.num_nodes == 1 and placement.gpus_per_node > gpus.count > 0:
        problems.append(Problem("resources.gpus_per_node", f"asks for {placement.gpus_per_node} GPUs; this machine has {gpus.count}"))
    if p.method.adapter == "qlora":
        if gpus.count == 0:
            problems.append(Problem("method.adapter", "qlora quantises the base model with bitsandbytes, which needs "
                                    f"an NVIDIA GPU; this machine has none ({gpus.reason}). Use adapter: lora here"))
        else:
            try:
                metadata.version("bitsandbytes")
            except metadata.PackageNotFoundError:
                problems.append(Problem("method.adapter", "qlora needs bitsandbytes: pip install bitsandbytes"))
    if placement.device == "cpu" and placement.dtype == "fp16":
        problems.append(Problem("model.dtype", "fp16 training needs a GPU (the CPU has no fp16 loss scaling kernels); use fp32 or bf16"))
    if p.inference.mode == "deepspeed" and p.inference.kernel_inject and gpus.count == 0:
        warnings.append("inference.kernel_inject: no GPU here, DeepSpeed-Inference will use the plain engine without fused kernels")
    if "nvme" in (p.deepspeed.offload_optimizer, p.deepspeed.offload_param):
        path = Path(p.deepspeed.nvme_path or "")
        if not path.exists():
            problems.append(Problem("deepspeed.nvme_path", f"folder not found: {path}"))
    return problems, warnings


# --------------------------------------------------------------------------------------------
# Preparing and starting
# --------------------------------------------------------------------------------------------


@dataclass
class PreparedRun:
    run_id: str
    run_dir: Path
    placement: Placement
    command: LaunchCommand
    warnings: list[str] = field(default_factory=list)


def prepare_run(
    lp: LoadedProfile,
    runs_dir: Path,
    *,
    resume_from: Path | None = None,
    parent_run_id: str | None = None,
    relation: str | None = None,
    node_rank: int | None = None,
    run_id: str | None = None,
    check_hardware: bool = True,
) -> PreparedRun:
    """Freeze the profile into a new run directory; raise ProfileError if it cannot launch here."""
    placement = resolve_placement(lp)
    warnings = list(lp.warnings)
    if check_hardware:
        problems, more = preflight(lp, placement)
        warnings += more
        if problems:
            file = str(lp.source) if lp.source else None
            for pr in problems:
                pr.file = file
            raise ProfileError(problems, file)
    prints = data_fingerprints(lp)
    prepared = prepare_data(lp, runs_dir.parent, prints)
    warnings += prepared.report.warnings
    run_id = run_id or new_run_id()
    run_dir = (runs_dir / run_id).resolve()
    run_dir.mkdir(parents=True, exist_ok=node_rank not in (None, 0))
    frozen = resolved_paths(lp)
    ds_config = build_ds_config(lp, placement)
    engine_args = ["--resume-from", str(resume_from)] if resume_from else []
    cmd = build_command(lp, placement, run_dir, node_rank=node_rank, engine_args=engine_args)
    env = environment(lp, placement, prints, prepared)
    (run_dir / "profile.yaml").write_text(frozen.to_yaml())
    (run_dir / "ds_config.json").write_text(json.dumps(ds_config, indent=2) + "\n")
    (run_dir / "command.txt").write_text(cmd.shell() + "\n")
    (run_dir / "environment.json").write_text(json.dumps(env, indent=2) + "\n")
    estimate = _estimate(lp, placement)
    if estimate and estimate.get("fits") is False:
        for problem in estimate.get("fit_problems") or ["the memory estimate says this will not fit"]:
            warnings.append(f"memory: {problem} (zerotune estimate {lp.source or 'PROFILE'} for the breakdown)")
    launch = {
        "run_id": run_id,
        "name": lp.profile.name,
        "argv": cmd.run_argv,
        "command": cmd.argv,
        "env": cmd.env,
        "cwd": str(Path.cwd()),
        "method": lp.profile.method.kind,
        "adapter": lp.profile.method.adapter,
        "zero_stage": lp.profile.deepspeed.zero_stage,
        "model": lp.profile.model.path or (lp.profile.model.config or {}).get("model_type", "scratch"),
        "world_size": placement.world_size,
        "device": placement.device,
        "dtype": placement.dtype,
        "parent_run_id": parent_run_id,
        "relation": relation,
        "resume_from": str(resume_from) if resume_from else None,
        "profile_hash": frozen.content_hash(),
        "data_fingerprint": env["data_fingerprint"],
        "estimate": estimate,
        "sample_interval": float(os.environ.get("ZEROTUNE_SAMPLE_INTERVAL", "2.0")),
        "node_rank": node_rank or 0,
    }
    (run_dir / "launch.json").write_text(json.dumps(launch, indent=2) + "\n")
    return PreparedRun(run_id, run_dir, placement, cmd, warnings)


def _estimate(lp: LoadedProfile, placement: Placement) -> dict[str, Any] | None:
    """The memory estimate to store beside the measured peaks, when the estimator can tell."""
    try:
        from engine.estimate import estimate_profile
    except ImportError:
        return None
    try:
        return estimate_profile(lp, placement)
    except Exception as exc:  # the estimate is advice; it never blocks a launch
        print(f"warning: no memory estimate: {exc}", file=sys.stderr)
        return None


def start_run(
    lp: LoadedProfile,
    workspace: Path,
    *,
    resume_from: Path | None = None,
    parent_run_id: str | None = None,
    relation: str | None = None,
    node_rank: int | None = None,
    run_id: str | None = None,
) -> PreparedRun:
    """Prepare the run directory and start its detached supervisor."""
    from engine.supervisor import spawn_supervisor
    from engine.workspace import db_path, runs_dir

    if resume_from is not None:
        resume_from = Path(resume_from).resolve()
        problem = checkpoint_problem(resume_from, None)
        if problem:
            raise ProfileError([Problem("", problem, str(resume_from))], str(resume_from))
    runs = runs_dir(workspace)
    runs.mkdir(parents=True, exist_ok=True)
    prepared = prepare_run(lp, runs, resume_from=resume_from, parent_run_id=parent_run_id,
                           relation=relation, node_rank=node_rank, run_id=run_id)
    spawn_supervisor(prepared.run_dir, db_path(workspace))
    return prepared


# --------------------------------------------------------------------------------------------
# Lineage: resume and rerun
# --------------------------------------------------------------------------------------------


class LineageError(Exception):
    """A run cannot be resumed or re-run; the message says why and what to do."""


def checkpoint_problem(ckpt: Path, world_size: int | None) -> str | None:
    """Why a checkpoint cannot be resumed from (None when it can)."""
    from engine.train import COMPLETE_MARKER

    if not ckpt.is_dir():
        return f"checkpoint not found: {ckpt}"
    marker = ckpt / COMPLETE_MARKER
    if not marker.exists() or not (ckpt / "trainer_state.json").exists():
        return (f"checkpoint {ckpt.name} is incomplete (the run ended while saving it); "
                "resume from an earlier one with zerotune run PROFILE --resume-from DIR")
    if world_size is not None:
        saved = json.loads(marker.read_text()).get("world_size")
        if saved and saved != world_size:
            tags = sorted(p.name for p in ckpt.glob("global_step*"))
            tag = tags[-1] if tags else "global_stepN"
            return (f"checkpoint {ckpt.name} was written by {saved} ranks; this launch has {world_size}. "
                    "A ZeRO checkpoint is partitioned per rank: convert it to a universal checkpoint "
                    f"with: python -m deepspeed.checkpoint.ds_to_universal --input_folder {ckpt / tag} "
                    f"--output_folder {ckpt / (tag + '_universal')}, or set resources.gpus_per_node to {saved}")
    return None


def newest_complete_checkpoint(run_dir: Path) -> tuple[Path | None, list[str]]:
    """The newest checkpoint with its completion marker, and notes on newer incomplete ones."""
    from engine.train import COMPLETE_MARKER

    notes: list[str] = []
    ckpts = sorted((run_dir / "checkpoints").glob("checkpoint-*"),
                   key=lambda p: int(p.name.split("-")[-1]) if p.name.split("-")[-1].isdigit() else -1,
                   reverse=True)
    for c in ckpts:
        if (c / COMPLETE_MARKER).exists() and (c / "trainer_state.json").exists():
            return c, notes
        notes.append(f"skipped incomplete checkpoint {c.name}")
    return None, notes


def _frozen(run_dir: Path) -> LoadedProfile:
    from engine.profile import load_profile

    path = run_dir / "profile.yaml"
    if not path.exists():
        raise LineageError(f"{run_dir} has no frozen profile.yaml; it cannot be replayed")
    return load_profile(path)


def _run_dir(workspace: Path, run_id: str) -> Path:
    from engine.history import get_run, open_db, run_dir_of
    from engine.workspace import db_path

    db = open_db(db_path(workspace))
    try:
        row = get_run(db, run_id)
    finally:
        db.close()
    rd = run_dir_of(row)
    if rd is None or not rd.exists():
        raise LineageError(f"the run directory of {run_id} is gone")
    return rd


def resume_run(workspace: Path, run_id: str) -> PreparedRun:
    """Continue a run from its newest complete checkpoint, as a new run linked to it."""
    rd = _run_dir(workspace, run_id)
    lp = _frozen(rd)
    ckpt, notes = newest_complete_checkpoint(rd)
    for n in notes:
        print(f"note: {n}", file=sys.stderr)
    if ckpt is None:
        raise LineageError(f"run {run_id} has no complete checkpoint to resume from; "
                           f"re-run it instead: zerotune runs rerun {run_id}")
    placement = resolve_placement(lp)
    problem = checkpoint_problem(ckpt, placement.world_size)
    if problem:
        raise LineageError(problem)
    return start_run(lp, workspace, resume_from=ckpt, parent_run_id=run_id, relation="resume")


def rerun_run(workspace: Path, run_id: str) -> PreparedRun:
    """The same frozen profile again, as a new run linked to the first."""
    rd = _run_dir(workspace, run_id)
    return start_run(_frozen(rd), workspace, parent_run_id=run_id, relation="rerun")
