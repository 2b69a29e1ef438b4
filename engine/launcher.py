"""The exact launcher command of a run: DeepSpeed's own launcher (or torchrun).

Multi-node is DeepSpeed's: a hostfile and pdsh/ssh from node 0, or ``--no_ssh`` where each
node starts its own launcher with its node rank (clusters without passwordless ssh).

On one node, the ``deepspeed`` command (deepspeed.launcher.runner) only works out the world
info and starts ``python -m deepspeed.launcher.launch`` with it; that costs a second Python
process importing DeepSpeed, 1.5 to 2 s before any rank starts. zerotune starts
deepspeed.launcher.launch itself with the same arguments (``LaunchCommand.exec_argv``) and
shows and records the ``deepspeed`` command it stands for (``argv``: command.txt,
``zerotune profile command``), which a person can run by hand to the same effect.
"""

from __future__ import annotations

import base64
import json
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
    """The command as a person types it (``deepspeed ...`` or ``torchrun ...``)."""
    env: dict[str, str]
    exec_argv: list[str] | None = None
    """What zerotune runs when it differs from ``argv``: the same launch, one process fewer."""

    @property
    def run_argv(self) -> list[str]:
        return self.exec_argv or self.argv

    def shell(self) -> str:
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(self.env.items()))
        return (env + " " if env else "") + shlex.join(self.argv)

    def with_module(self, module: str) -> LaunchCommand:
        """The same launch of another engine module (engine.infer)."""
        def swap(argv: list[str]) -> list[str]:
            return [module if a == ENGINE_MODULE else a for a in argv]

        return LaunchCommand(swap(self.argv), dict(self.env), swap(self.exec_argv) if self.exec_argv else None)


def local_launch_argv(num_local_ranks: int, master_addr: str, master_port: int,
                      module_args: list[str], *, module: bool = True) -> list[str]:
    """``python -m deepspeed.launcher.launch`` as deepspeed.launcher.runner starts it for
    ``deepspeed --num_gpus N --master_addr A --master_port P --module ...`` on one node:
    world info ``{"localhost": [0 .. N-1]}`` (the launcher sets CUDA_VISIBLE_DEVICES from it)."""
    world = json.dumps({"localhost": list(range(num_local_ranks))}).encode()
    return [sys.executable, "-u", "-m", "deepspeed.launcher.launch",
            f"--world_info={base64.urlsafe_b64encode(world).decode()}",
            f"--master_addr={master_addr}", f"--master_port={master_port}",
            *(["--module"] if module else []), "--log_level=info", *module_args]


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
    exec_argv = None
    if placement.num_nodes == 1:
        # Without a hostfile the runner itself launches on 127.0.0.1 whatever --master_addr says.
        exec_argv = local_launch_argv(placement.gpus_per_node, "127.0.0.1", port, [ENGINE_MODULE, *entry])
    return LaunchCommand(argv, env, exec_argv)
