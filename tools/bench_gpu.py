"""One command for the first GPU minutes: your (patched) script's own compiled training step, plain and hybrid.

    python tools/bench_gpu.py path/to/train_gpt.py --layers 0                 # one GPU: python train_gpt.py
    python tools/bench_gpu.py path/to/train_gpt.py --layers 0,5 --nproc 8 --out bench/gpu/record_8xh100.md

Runs the script as you would (python, or torchrun with --nproc > 1), from the current folder (the one
its ./data is in): first with no HYMBA_* variable (the plain model), then with HYMBA_LAYERS=--layers
(default: $HYMBA_LAYERS, else 0) and the other HYMBA_* variables of your environment; --rounds N
alternates the two N times. Each run gets ITERATIONS=--iterations, VAL_LOSS_EVERY=0 (no validation
before the last step), TRAIN_LOG_EVERY=1, MAX_WALLCLOCK_SECONDS=0 (no cap: every step runs) and its
own RUN_ID (its log: logs/<RUN_ID>.txt); everything else is the script's own or yours from the
environment, its warm-up steps included (the hosts compile their model there, before the clock).
The tool reads the script's own console lines:

    step:N/M train_loss:X train_time:Tms step_avg:...      this project's train_gpt.py, the challenge's root script
    N/M train_loss: X train_time: Ym tok/s: R              PR #1493's family and the late-April record
    peak memory allocated: P MiB reserved: ...             after the last step (CUDA)

and stops the run (its whole process group) once training is over, at the first line of what follows
it (`peak memory allocated`, `ema:applying EMA weights` or `Serialized model`), before the export and
evaluation; no child is left running, whatever happens. Step time: the median over steps
--skip+1..N of each step's time, from the logged cumulative training time (in the tok/s families:
step x tokens per step / tok/s, with the tokens per step from the script's `train_batch_tokens`).
Printed: a markdown table (step ms, tokens/s, peak MiB per run), and the hybrid / plain ratios.

Refused in one line (exit 2): no CUDA (unless --device cpu), a script that is not there, a bad option,
a hybrid run that logs no `hymba:layer` line (the script is not patched: tools/patch_host.py) or a
plain run that does, a run that ends or stalls before its last step. --device cpu runs a CPU-runnable
script (this project's train_gpt.py, or a CPU copy of a host, tests/host_cpu.py) with no GPU visible
and, unless set, TORCHDYNAMO_DISABLE=1 (what those copies need); that is what the tests run.
"""
from __future__ import annotations

import argparse
import os
import re
import select
import shlex
import signal
import statistics
import subprocess
import sys
import time
import uuid
from collections import deque
from pathlib import Path

ROOT_STEP = re.compile(r"^step:(\d+)/(\d+) train_loss:\S+ train_time:(\d+)ms")
TOKS_STEP = re.compile(r"^(\d+)/(\d+) train_loss: \S+ train_time: [\d.]+m tok/s: (\d+)")
BATCH_TOKENS = re.compile(r"^(?:  )?train_batch_tokens: ?(\d+)")
PEAK = re.compile(r"^peak memory allocated: (\d+) MiB")
TRAINING_OVER = re.compile(r"^(?:peak memory allocated:|ema:applying EMA weights|Serialized model)")
HYMBA_LINE = re.compile(r"^hymba:layer \d+ ")
LAYERS = re.compile(r"^\d+(?:,\d+)*$")
RUN_SETTINGS = {"VAL_LOSS_EVERY": "0", "TRAIN_LOG_EVERY": "1", "MAX_WALLCLOCK_SECONDS": "0"}


class BenchError(Exception):
    """A refusal: one line for the user."""


def run_once(cmd: list[str], env: dict[str, str], iterations: int, timeout: float) -> dict:
    """Run the script until its training is over, then stop it; its step times, tokens per step and peak."""
    cumulative: dict[int, float] = {}  # step -> training ms so far
    found = {"hymba": 0, "tokens": None, "peak": None, "toks": {}}
    tail: deque[str] = deque(maxlen=12)
    # its own process group, so that stopping it stops torchrun's workers too
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + timeout
    try:
        for line in read_lines(proc, deadline):
            tail.append(line)
            if m := ROOT_STEP.match(line):
                cumulative[int(m[1])] = float(m[3])
            elif m := TOKS_STEP.match(line):
                found["toks"][int(m[1])] = int(m[3])
            elif m := BATCH_TOKENS.match(line):
                found["tokens"] = int(m[1])
            elif HYMBA_LINE.match(line):
                found["hymba"] += 1
            if TRAINING_OVER.match(line):
                if m := PEAK.match(line):
                    found["peak"] = int(m[1])
                break
        else:
            if time.monotonic() >= deadline:
                raise BenchError(f"{shlex.join(cmd)}: no end of training within --timeout {timeout:.0f} s; last line: {last(tail)}")
            raise BenchError(f"{shlex.join(cmd)}: exited with code {proc.wait()} before its training was over; last line: {last(tail)}")
    finally:
        stop(proc)
    if found["toks"]:  # tok/s is cumulative: step x tokens per step / tok/s is the training time so far
        if not found["tokens"]:
            raise BenchError(f"{shlex.join(cmd)}: logs tok/s but no train_batch_tokens; cannot turn its tok/s into step times")
        cumulative = {s: 1000.0 * s * found["tokens"] / r for s, r in found["toks"].items() if r > 0}
    if max(cumulative, default=0) < iterations:
        raise BenchError(f"{shlex.join(cmd)}: its training ended at step {max(cumulative, default=0)} of {iterations} "
                         "(no 'step:N/M train_loss:...' or 'N/M train_loss: ... tok/s:' line for the last steps)")
    return {"cumulative": cumulative, "tokens": found["tokens"], "peak": found["peak"], "hymba": found["hymba"]}


def read_lines(proc: subprocess.Popen, deadline: float):
    """The child's output lines (without their newline) until it closes its output or the deadline passes;
    unbuffered reads, so a line is seen as soon as it is written."""
    fd, pending = proc.stdout.fileno(), b""
    while (left := deadline - time.monotonic()) > 0:
        if not select.select([fd], [], [], min(left, 1.0))[0]:
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            if pending:
                yield pending.decode("utf-8", "replace")
            return
        *lines, pending = (pending + chunk).split(b"\n")
        yield from (line.decode("utf-8", "replace") for line in lines)


def last(tail: deque) -> str:
    return next((line for line in reversed(tail) if line.strip()), "(none)")[:300]


def stop(proc: subprocess.Popen) -> None:
    """End the run's whole process group: SIGTERM, then SIGKILL after 10 s."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        if proc.poll() is not None:
            break
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(wait)
        except subprocess.TimeoutExpired:
            continue
    try:  # workers that outlived their launcher
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    if proc.stdout:
        proc.stdout.close()


def step_times(cumulative: dict[int, float], skip: int) -> list[float]:
    """Each logged step's own time (ms) after the first `skip` steps, from cumulative times of consecutive steps."""
    steps = sorted(s for s in cumulative if s >= skip)
    return [(cumulative[b] - cumulative[a]) / (b - a) for a, b in zip(steps, steps[1:])]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("script", type=Path, help="the (patched) training script: train_gpt.py of yours, root, PR #1493 or the record")
    p.add_argument("--layers", default=os.environ.get("HYMBA_LAYERS", "0"), help="HYMBA_LAYERS of the hybrid run (default: $HYMBA_LAYERS, else 0)")
    p.add_argument("--iterations", type=int, default=40, help="ITERATIONS of each run (default 40)")
    p.add_argument("--skip", type=int, default=10, help="steps left out of the step time, from the start (default 10)")
    p.add_argument("--rounds", type=int, default=1, help="plain, hybrid, plain, hybrid, ...: this many of each (default 1)")
    p.add_argument("--nproc", type=int, default=1, help="GPUs: > 1 runs torchrun --standalone --nproc_per_node N (default 1: python)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds a run may take before it is stopped and refused (default 1800)")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu: run a CPU-runnable script (tests)")
    p.add_argument("--out", type=Path, help="also write the markdown here")
    return p.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    if not args.script.is_file():
        raise BenchError(f"{args.script}: no such script; give the path of the training script to time")
    if not LAYERS.match(args.layers):
        raise BenchError(f"--layers {args.layers!r} is not a list of block indices: give e.g. 0 or 0,5")
    if args.skip < 1 or args.iterations < args.skip + 2:
        raise BenchError(f"--iterations {args.iterations} --skip {args.skip}: need --skip >= 1 and --iterations >= --skip + 2 "
                         "(at least two timed steps)")
    for name in ("rounds", "nproc"):
        if getattr(args, name) < 1:
            raise BenchError(f"--{name} {getattr(args, name)} must be >= 1")
    if args.timeout <= 0:
        raise BenchError(f"--timeout {args.timeout} must be > 0 seconds")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    args.argv = argv
    try:
        check_args(args)
        import torch
        if args.device == "cuda" and not torch.cuda.is_available():
            raise BenchError("CUDA is not available: this tool times the training step on the GPU; --device cpu runs a CPU-runnable "
                             "script (e.g. a CPU copy of a host, tests/host_cpu.py)")
        text = bench(args, torch)
    except BenchError as e:
        print(f"bench_gpu.py: error: {e}", file=sys.stderr)
        return 2
    print(text, end="")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        print(f"wrote {args.out}")
    return 0


def bench(args: argparse.Namespace, torch) -> str:
    base = {k: v for k, v in os.environ.items() if not k.startswith("HYMBA_")}
    base.update(RUN_SETTINGS, ITERATIONS=str(args.iterations), PYTHONUNBUFFERED="1")
    if args.device == "cpu":
        base["CUDA_VISIBLE_DEVICES"] = ""
        base.setdefault("TORCHDYNAMO_DISABLE", "1")
    hybrid_env = {**{k: v for k, v in os.environ.items() if k.startswith("HYMBA_")}, "HYMBA_LAYERS": args.layers}
    configs = {"plain": {}, f"HYMBA_LAYERS={args.layers}": hybrid_env}
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}"]
                if args.nproc > 1 else [sys.executable])
    cmd = [*launcher, str(args.script)]
    runs = []  # (config, round, result)
    for r in range(args.rounds):
        for name, extra in configs.items():
            run_id = f"bench_gpu_{uuid.uuid4().hex[:10]}"
            result = run_once(cmd, {**base, **extra, "RUN_ID": run_id}, args.iterations, args.timeout)
            if extra and not result["hymba"]:
                raise BenchError(f"{args.script}: the run with HYMBA_LAYERS={args.layers} logged no 'hymba:layer' line: the script is not "
                                 "patched (python tools/patch_host.py SCRIPT), or it swaps no layer")
            if not extra and result["hymba"]:
                raise BenchError(f"{args.script}: the run without HYMBA_* logged 'hymba:layer' lines: it is not the plain model")
            result["ms"] = step_times(result["cumulative"], args.skip)
            result["run_id"] = run_id
            runs.append((name, r + 1, result))
    return report(args, torch, cmd, runs, list(configs))


def report(args: argparse.Namespace, torch, cmd: list[str], runs: list, names: list[str]) -> str:
    cuda = args.device == "cuda"
    device = f"{args.nproc} x {torch.cuda.get_device_name(0)}" if cuda else "cpu"
    peak = lambda res: f"{res['peak']:,}" if cuda and res["peak"] is not None else "-"
    rate = lambda res, ms: f"{res['tokens'] / ms * 1000:,.0f}" if res["tokens"] else "-"
    lines = [f"# Training step of {args.script.name}: plain against HYMBA_LAYERS={args.layers}", "",
             f"command: `{shlex.join(['python', 'tools/bench_gpu.py', *args.argv])}`",
             f"runs: `{shlex.join(cmd)}` with ITERATIONS={args.iterations} "
             + " ".join(f"{k}={v}" for k, v in RUN_SETTINGS.items()) + f"; device: {device}; torch {torch.__version__}",
             f"step ms: median over steps {args.skip + 1}..{args.iterations} of each step's time (from the script's own log lines); "
             "tokens/s: the script's train_batch_tokens / step ms; peak: its `peak memory allocated` line", "",
             "| run | round | log | step ms | tokens/s | peak MiB |", "|---|---|---|---|---|---|"]
    medians: dict[str, list[float]] = {n: [] for n in names}
    peaks: dict[str, list[int]] = {n: [] for n in names}
    for name, r, res in runs:
        ms = statistics.median(res["ms"])
        medians[name].append(ms)
        if res["peak"] is not None:
            peaks[name].append(res["peak"])
        lines.append(f"| {name} | {r} | logs/{res['run_id']}.txt | {ms:.1f} | {rate(res, ms)} | {peak(res)} |")
    plain, hybrid = (statistics.median(medians[n]) for n in names)
    ratio = f"{names[1]} / plain: step time **{hybrid / plain:.3f}x**, tokens/s {plain / hybrid:.3f}x"
    if cuda and all(peaks.values()) and min(peaks[names[0]]) > 0:
        ratio += f", peak memory {max(peaks[names[1]]) / max(peaks[names[0]]):.3f}x"
    lines += ["", ratio + (f" (medians over {args.rounds} rounds)" if args.rounds > 1 else "") + "."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
