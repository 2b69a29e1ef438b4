"""Cold start of the terminal UI: time from process start to the first frame on the terminal.

    .venv/bin/python bench/tui_startup.py [--repeat 5] [--size 80x24]

Starts ``zerotune`` (``python -m engine.cli``) in a pseudo-terminal of the given size with an
empty workspace, reads what it writes, and stops the clock when the home screen's text
("Recent runs") has been drawn; then presses Ctrl+Q. Beside it, the same measure for a bare
``python -c pass`` and for importing ``tui.app``, so the figure can be read against what any
Python program costs on this machine. Prints median and best of each; target: first frame
under 1.0 s.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import pty
import select
import statistics
import struct
import subprocess
import sys
import tempfile
import termios
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TARGET_S = 1.0
MARKER = b"Recent runs"


def _drain(fd: int, until: float, marker: bytes | None = None) -> tuple[bytes, float | None]:
    """Read the terminal until ``marker`` shows up (its time) or the deadline passes."""
    buf = b""
    while time.perf_counter() < until:
        ready, _, _ = select.select([fd], [], [], 0.05)
        if not ready:
            continue
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        buf += chunk
        if marker is not None and marker in buf:
            return buf, time.perf_counter()
    return buf, None


def first_frame(workspace: Path, cols: int, rows: int, timeout: float = 30.0) -> float:
    """Seconds from spawning ``zerotune`` to the home screen on the terminal."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
    env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": str(cols), "LINES": str(rows),
           "PYTHONPATH": str(REPO), "ZEROTUNE_HOME": str(workspace)}
    env.pop("TEXTUAL", None)
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "engine.cli"], stdin=slave, stdout=slave,
                            stderr=slave, env=env, cwd=workspace, start_new_session=True)
    os.close(slave)
    try:
        out, t1 = _drain(master, t0 + timeout, MARKER)
        if t1 is None:
            raise RuntimeError(f"no first frame within {timeout} s; the terminal got: "
                               f"{out[-400:]!r}")
        os.write(master, b"\x11")  # Ctrl+Q
        _drain(master, time.perf_counter() + 10)
        proc.wait(timeout=10)
        return t1 - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)


def python_time(code: str) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True,
                   env={**os.environ, "PYTHONPATH": str(REPO)})
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--size", default="80x24", help="terminal COLSxROWS")
    args = ap.parse_args()
    cols, rows = (int(x) for x in args.size.split("x"))
    with tempfile.TemporaryDirectory() as tmp:
        ws = Path(tmp)
        first_frame(ws, cols, rows)  # warm the file cache (bytecode, shared libraries)
        frames, bare, imports = [], [], []
        for _ in range(args.repeat):
            bare.append(python_time("pass"))
            imports.append(python_time("import tui.app"))
            frames.append(first_frame(ws, cols, rows))
    med = statistics.median(frames)
    print(f"zerotune TUI cold start ({cols}x{rows}, {args.repeat} runs, empty workspace)")
    print(f"  python -c pass           median {statistics.median(bare):6.3f} s   best "
          f"{min(bare):6.3f} s")
    print(f"  import tui.app           median {statistics.median(imports):6.3f} s   best "
          f"{min(imports):6.3f} s")
    print(f"  start to first frame     median {med:6.3f} s   best {min(frames):6.3f} s   "
          f"target < {TARGET_S:.1f} s: {'ok' if med < TARGET_S else 'MISSED'}")
    print(f"  first frame / bare python: {med / statistics.median(bare):.1f}x")
    return 0 if med < TARGET_S else 1


if __name__ == "__main__":
    sys.exit(main())
