"""Where runs live: the workspace directory and the paths inside it.

The workspace is ``--workspace DIR`` when given, else ``$ZEROTUNE_HOME``, else the current
directory (like ``mlruns/``). Runs live in ``<workspace>/runs/`` and the history database is
``<workspace>/runs/history.db``.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV_VAR = "ZEROTUNE_HOME"


def resolve_workspace(arg: str | os.PathLike[str] | None = None) -> Path:
    """The workspace directory: ``arg``, else ``$ZEROTUNE_HOME``, else the current directory."""
    if arg:
        return Path(arg).expanduser().resolve()
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser().resolve()
    return Path.cwd().resolve()


def runs_dir(workspace: str | os.PathLike[str]) -> Path:
    """The directory holding one sub-directory per run."""
    return Path(workspace) / "runs"


def db_path(workspace: str | os.PathLike[str]) -> Path:
    """The history database of a workspace."""
    return runs_dir(workspace) / "history.db"
