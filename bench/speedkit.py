"""What bench_speed.py measures with: interleaved medians, train_gpt.py's whole training step on random tokens
(baseline or hybrid, eager or compiled, at any sequence length) and ssd_scan's inputs and error."""
from __future__ import annotations

import contextlib
import os
import shlex
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from benchkit import ROOT  # first: it sets the import paths

import torch

import hymba_layer
import train_gpt

# ----------------------------------------------------------------------------- timing

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timer(device: torch.device):
    def measure(fn, reps: int) -> float:
        """ms per call of fn, over reps calls."""
        sync(device)
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        sync(device)
        return 1000 * (time.perf_counter() - t0) / reps

    return measure


def interleaved_medians(fns: dict, samples: int, reps: int, measure, warmup: int = 2) -> dict:
    """Median ms per call of each fn, sampled A, B, A, B, ... so machine noise hits every one alike."""
    for fn in fns.values():  # warm-up
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(samples):
        for name, fn in fns.items():
            times[name].append(measure(fn, reps))
    return {name: statistics.median(ts) for name, ts in times.items()}


def first_call_s(fn, device: torch.device) -> float:
    """Seconds of fn's first call: for a compiled fn, tracing and compiling forward and backward. Call the
    eager module once before: the host's Rotary caches cos/sin on its first call, and a model traced
    with that cache empty compiles a second time once it is filled (train_gpt.py's warm-up pays both)."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


@contextlib.contextmanager
def compiled_once():
    """Timings of compiled contenders count only if nothing recompiles while they are taken."""
    with torch._dynamo.config.patch(error_on_recompile=True):
        yield


def compile_label(backend: str) -> str:
    return f"torch.compile(dynamic=False, fullgraph=True, backend={backend!r})"


def describe_device(device: torch.device) -> str:
    """The GPU's name, or the CPU's threads and load average (other processes on a shared CPU skew timings)."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    return f"cpu ({torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f})"


def command_line() -> str:
    """The command that is running, with the env vars that change what it measures, to head its output."""
    env = [f"{k}={shlex.quote(v)}" for k, v in sorted(os.environ.items()) if k.startswith("HYMBA_") or k == "OMP_NUM_THREADS"]
    script = Path(sys.argv[0]).resolve()
    argv = [str(script.relative_to(ROOT)) if script.is_relative_to(ROOT) else sys.argv[0], *sys.argv[1:]]
    return " ".join([*env, "python", *map(shlex.quote, argv)])


# ----------------------------------------------------------------------------- a whole training step

@dataclass(frozen=True)
class StepShape:
    """A GPT (train_gpt.py's env settings) and one optimizer step: micro_batches of rows x TRAIN_SEQ_LEN tokens."""

    settings: dict
    micro_batches: int
    rows: int
    about: str

    @property
    def tokens(self) -> int:
        return self.micro_batches * self.rows * self.settings["TRAIN_SEQ_LEN"]

    def __str__(self) -> str:
        s = self.settings
        return (f"{s['NUM_LAYERS']} blocks x {s['MODEL_DIM']}, {s['NUM_HEADS']} heads / {s['NUM_KV_HEADS']} KV, MLP {s['MLP_MULT']}x, "
                f"vocab {s['VOCAB_SIZE']}; {self.micro_batches} micro-batches of {self.rows} x {s['TRAIN_SEQ_LEN']} = {self.tokens:,} tokens per step")


SHAPE_VARS = ("NUM_LAYERS", "MODEL_DIM", "NUM_HEADS", "NUM_KV_HEADS", "MLP_MULT", "VOCAB_SIZE", "TRAIN_SEQ_LEN")
CHALLENGE = dict(NUM_LAYERS=9, MODEL_DIM=512, NUM_HEADS=8, NUM_KV_HEADS=4, MLP_MULT=2, VOCAB_SIZE=1024, TRAIN_SEQ_LEN=1024)
GRAD_ACCUM = 8  # train_gpt.py on one process: 8 // WORLD_SIZE micro-batches per step


STEP_SHAPES = {  # bench_speed.py adds the quality presets' shapes
    "9x512": StepShape(CHALLENGE, GRAD_ACCUM, 64, "the challenge on one GPU, by gradient accumulation"),
    "tiny": StepShape(dict(CHALLENGE, NUM_LAYERS=2, MODEL_DIM=64, NUM_HEADS=4, NUM_KV_HEADS=2, VOCAB_SIZE=256, TRAIN_SEQ_LEN=64), 2, 2,
                      "a smoke test"),
}


def at_seq(shape: StepShape, seq: int, tokens: int, micro_batches: int = 1) -> StepShape:
    """`shape`'s model at TRAIN_SEQ_LEN=seq, `tokens` per step as micro_batches of rows x seq: equal tokens per
    step at every T."""
    if tokens % (micro_batches * seq):
        raise ValueError(f"{tokens} tokens per step are not {micro_batches} micro-batch(es) of whole rows of {seq}")
    return StepShape(dict(shape.settings, TRAIN_SEQ_LEN=seq), micro_batches, tokens // (micro_batches * seq), shape.about)


@contextlib.contextmanager
def environment(settings: dict):
    """os.environ without its HYMBA_* vars and with `settings`, restored afterwards."""
    saved = dict(os.environ)
    for name in [n for n in os.environ if n.startswith("HYMBA_")]:
        del os.environ[name]
    os.environ.update({k: str(v) for k, v in settings.items()})
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


@dataclass
class TrainingStep:
    step: Callable[[], None]
    params: int
    optimizer_ms: list[float]  # each step's optimizer part (Muon + Adam), timed inside it
    compile_s: float | None  # with a backend: the first step, tracing and compiling (first_call_s)
    peak_mib: float | None  # CUDA: peak allocated during a step, above what was allocated before the model was built


def training_step(shape: StepShape, hymba: dict, device: torch.device, backend: str | None) -> TrainingStep:
    """train_gpt.py's model and optimizers as its main() builds them (HYMBA_* settings from `hymba`; on CUDA
    bf16 autocast and set_training_dtypes; with a backend, the model compiled as main() does), and a
    function taking one step as main()'s train_step does: each micro-batch's loss / micro_batches
    backward, then every optimizer steps and zeroes its grads (timed apart: a sync before and after). Left out: the LR schedule (it only scales
    the rates), grad clipping (off by default) and reading the loss. Tokens: fixed random ids."""
    cuda = device.type == "cuda"
    before = torch.cuda.memory_allocated(device) if cuda else 0
    with environment({**shape.settings, **hymba}):
        args = train_gpt.Hyperparameters()
        torch.manual_seed(0)
        base_model, _ = train_gpt.build_model(args, device, log=lambda line: None)
        optimizers = train_gpt.build_optimizers(base_model, args, device)
    model = torch.compile(base_model, dynamic=False, fullgraph=True, backend=backend) if backend else base_model
    tokens = torch.randint(args.vocab_size, (shape.micro_batches, shape.rows, args.train_seq_len + 1), generator=torch.Generator().manual_seed(0))
    xs, ys = tokens[..., :-1].contiguous().to(device), tokens[..., 1:].contiguous().to(device)

    optimizer_ms = []

    def step():
        for x, y in zip(xs, ys):
            with torch.autocast(device.type, torch.bfloat16, enabled=cuda):
                loss = model(x, y)
            (loss / shape.micro_batches).backward()
        sync(device)
        t0 = time.perf_counter()
        for opt in optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)
        sync(device)
        optimizer_ms.append(1000 * (time.perf_counter() - t0))

    compile_s = None
    if backend:
        with torch.no_grad(), torch.autocast(device.type, torch.bfloat16, enabled=cuda):
            base_model(xs[0], ys[0])  # fills the Rotary caches (first_call_s)
        compile_s = first_call_s(step, device)
    peak_mib = None
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        peak_mib = (torch.cuda.max_memory_allocated(device) - before) / 2**20
    return TrainingStep(step, sum(p.numel() for p in base_model.parameters()), optimizer_ms, compile_s, peak_mib)


# ----------------------------------------------------------------------------- the scan

def scan_inputs(heads: int, groups: int, head_dim: int, batch: int, T: int, device: torch.device, dtype: torch.dtype,
                seed: int) -> list[torch.Tensor]:
    """x (batch, T, heads, head_dim), log_a (fp32, in [-1, 0]), B (batch, T, groups, head_dim) and C (batch, T, heads,
    head_dim) for ssd_scan at a hybrid layer's SSM shape: HybridHeads scans v (dt-scaled) with k as B, one per KV
    group, and q as C, so the state is head_dim x head_dim."""
    g = torch.Generator(device=device).manual_seed(seed)
    return [torch.randn(batch, T, heads, head_dim, device=device, generator=g).to(dtype),
            -torch.rand(batch, T, heads, device=device, generator=g),
            torch.randn(batch, T, groups, head_dim, device=device, generator=g).to(dtype),
            torch.randn(batch, T, heads, head_dim, device=device, generator=g).to(dtype)]


def scan_error(y: torch.Tensor, inputs: list[torch.Tensor]) -> float:
    """max |y - y_ref| / max |y_ref|, y_ref from the step-by-step reference in fp64."""
    y_ref, _ = hymba_layer.ssd_scan_reference(*(t.double() for t in inputs))
    return ((y.double() - y_ref).abs().max() / y_ref.abs().max()).item()
