"""What the benchmarks share; each bench/*.py imports it first. The one place bench code sets its import
paths: the repo root (train_gpt.py, hymba_layer.py), tools/ (make_dataset, patch_host, make_record, logparse, demo)
and tests/ (host_cpu). Also: where results go, and one training run as a subprocess, reused once finished."""
from __future__ import annotations

import contextlib
import fcntl
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
for folder in (ROOT / "tests", ROOT / "tools", ROOT):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

from logparse import parse_log  # noqa: E402  (tools/, on the path from here on)

RESULTS = ROOT / "bench" / "results"  # each benchmark's outputs: bench/results/<run>/ or <name>.md
SHARED = ROOT.parent / "shared"  # the challenge's tokenizers and host scripts, beside the repo


def relative(path: Path) -> str:
    """`path` as a command line in a results file names it: from the repo root when inside it."""
    path = Path(path).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


@contextlib.contextmanager
def machine_lock():
    """With TORCH_LOCK=<file> set, hold an exclusive flock on that file (one torch job at a time on a shared machine, run
    by run, so other jobs fit between a benchmark's runs without overlapping a timed one); else nothing."""
    path = os.environ.get("TORCH_LOCK")
    if not path:
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def train_run(script: Path, folder: Path, env: dict, label: str, finished: Callable[[dict], bool]) -> dict:
    """`python script` in `folder` (RUN_ID=run, so the log is folder/logs/run.txt) with os.environ less its HYMBA_*
    vars plus `env`, unless that log already holds a run that `finished` accepts; the parsed log. A failed run
    raises with the tail of its output."""
    log = folder / "logs" / "run.txt"
    if not (log.exists() and finished(parse_log(log))):
        folder.mkdir(parents=True, exist_ok=True)
        full = {k: v for k, v in os.environ.items() if not k.startswith("HYMBA_")}
        full.update({k: str(v) for k, v in env.items()}, RUN_ID="run")
        with machine_lock():
            t0 = time.time()
            proc = subprocess.run([sys.executable, str(script)], cwd=folder, env=full, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{label} failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        print(f"  {label}: {time.time() - t0:.0f}s", flush=True)
    return parse_log(log)
