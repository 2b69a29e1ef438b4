"""The exact launcher command of a run: DeepSpeed's own launcher (or torchrun).

Multi-node is DeepSpeed's: a hostfile and pdsh/ssh from node 0, or ``--no_ssh`` where each
node starts its own launcher with its node rank (clusters without passwordless ssh).
"""

from __future__ import annotations

import shlex
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

from engine.dsconfig import Placement
from engine.profile import LoadedProfile

ENGINE_MODULE = "engine.train"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _bin(name: str) -> str:
    """The launcher script next to this Python (the venv's), else the one on PATH."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


@dataclass
class LaunchCommand:
    argv: list[str]
    env: dict[str, str]

    def shell(self) -> str:
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(self.env.items()))
        return (env + " " if env else "") + shlex.join(self.argv)


def build_command(
    lp: LoadedProfile,
    placement: Placement,
    run_dir: Path,
    *,
    master_port: int | None = None,
    node_rank: int | None = None,
    engine_args: list[str] | None = None,
) -> LaunchCommand:
    r = lp.profile.resources
    port = master_port or (r.master_port if isinstance(r.master_port, int) else free_port())
    entry = ["--run-dir", str(run_dir), *(engine_args or [])]
    env: dict[str, str] = {}
    if placement.device == "cpu":
        env["DS_ACCELERATOR"] = "cpu"
    hostfile = str(lp.resolve_path(r.hostfile)) if r.hostfile else None
    if r.launcher == "torchrun":
        argv = [_bin("torchrun"), f"--nnodes={placement.num_nodes}",
                f"--nproc_per_node={placement.gpus_per_node}",
                f"--master_addr={r.master_addr or '127.0.0.1'}", f"--master_port={port}"]
        if placement.num_nodes > 1:
            argv.append(f"--node_rank={node_rank or 0}")
        argv += ["-m", ENGINE_MODULE, *entry]
        return LaunchCommand(argv, env)
    argv = [_bin("deepspeed")]
    if placement.num_nodes > 1:
        if hostfile:
            argv += ["--hostfile", hostfile]
        argv += ["--num_nodes", str(placement.num_nodes), "--num_gpus", str(placement.gpus_per_node)]
        if r.master_addr:
            argv += ["--master_addr", r.master_addr]
        if r.no_ssh:
            argv += ["--no_ssh", "--node_rank", str(node_rank or 0)]
    else:
        # An explicit hostfile-free single node; deepspeed would otherwise read /job/hostfile.
        argv += ["--num_gpus", str(placement.gpus_per_node)]
        if placement.device == "cpu":
            argv += ["--master_addr", "127.0.0.1"]
    argv += ["--master_port", str(port), "--module", ENGINE_MODULE, *entry]
    return LaunchCommand(argv, env)
