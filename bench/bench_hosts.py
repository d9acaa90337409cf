"""hymba_layer.py inside the challenge's own hosts, at equal steps, paired by seed, on the CPU.

    python3 bench/bench_hosts.py --family root --seeds 1337,1338 --out bench/results/hosts_root
    python3 bench/bench_hosts.py --family pr1493 --seeds 1337,1338 --out bench/results/hosts_pr1493
    TORCH_LOCK=/tmp/torch.lock python3 bench/bench_hosts.py --family record --seeds 1337,1338,1339 --out bench/results/hosts_record64
    TORCH_LOCK=/tmp/torch.lock python3 bench/bench_hosts.py --family pr1493_64 --seeds 1337,1338,1339 --out bench/results/hosts_pr1493_64
    python3 bench/bench_hosts.py --family record --seeds 1337 --runs record,record+hymba --set ITERATIONS=800 --out bench/results/hosts_record64_steps800

root: per seed, four runs with the same settings and data: the challenge's root train_gpt.py (a CPU
copy, tests/host_cpu.py), the same patched with HYMBA_LAYERS=0 (tools/patch_host.py), this project's
train_gpt.py, and it with HYMBA_LAYERS=0. The table shows the hybrid's gain in each host and how
closely the two hosts agree (so this project's results transfer to root-based scripts).
pr1493: per seed, the PR #1493 record script (CPU copy) plain and patched with HYMBA_LAYERS=0: its
post-EMA score before GPTQ, after GPTQ int6 (`quantized`) and sliding-window, so the table shows the
hybrid's gain and each one's quantization gap.

record: the late-April record (record_0429, CPU copy) at the challenge's head size 64, with its own optimizer,
EMA, GPTQ and phased LoRA TTT, per seed: plain, hybrid (HYMBA_LAYERS=0, the module's defaults), and
three bench-only variants, each one change in the copy (never in hymba_layer.py or tools/patch_host.py):
  nodecay   the dynamics (`.hymba.` parameters) in a scalar-AdamW group of their own with weight_decay 0
            (Mamba keeps A_log, dt_bias and D out of decay; the record's ADAM_WD=0.02 pulls them to zero)
  xsa-attn  XSA only on the hybrid layer's attention heads: the SSM heads' output skips `_xsa_efficient`
            (which would remove each head's component along its value v_t: D * v_t and the current token's term)
  control   (run `record+control`) the SSM heads kept as softmax heads with the same taps on their values and no
            dynamics: the attribution control inside the host (bench/attribution_heads.py's ControlHeads)
The table: pre-quantization (post-EMA), GPTQ-quantized and quantized + phased TTT val_bpb, paired deltas vs plain
and vs the default hybrid, and the training step time relative to plain (from the host's own tok/s).
pr1493_64: PR #1493 at head size 64 (4 x 256, 4 heads of 64 / 2 KV heads), the same five runs.
--runs picks some of a family's runs (default: all).

Data: the built-in corpus (tools/make_dataset.py) tokenized with the challenge's sp1024 / sp8192
models from ../shared/tokenizers/. Not FineWeb, and fp32 on the CPU (host_cpu.py
says why): numbers compare configurations, they are not leaderboard scores.
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import re
import shutil
import statistics
import sys
from pathlib import Path

import numpy as np

from benchkit import ROOT, SHARED, relative, train_run  # first: it sets the import paths

import attribution_heads
import host_cpu
import patch_host
from make_dataset import builtin_shards, read_shard, write_shard

HOSTS = SHARED / "hosts"
TOKENIZERS = SHARED / "tokenizers"
HYBRID = {"HYMBA_LAYERS": "0"}  # block 0, the placement the previous design measured best (RESULTS.md)

# the record's feature switches as its run sets them (tests/test_host_record.py's TINY): SmearGate, the sparse
# head-output gate at scale 0.5, the gate int8-quantized
RECORD_FEATURES = dict(SMEAR_GATE_ENABLED=1, SPARSE_ATTN_GATE_ENABLED=1, SPARSE_ATTN_GATE_SCALE=0.5, GATED_ATTN_QUANT_GATE=1)
# settings the hosts read with the same meaning; small enough for 2 CPU cores. The *64 families: the challenge's head
# size (4 x 256: 4 heads of 64, 2 KV heads, so the hybrid layer gets 2 attention + 2 SSM heads), 256-token rows, 200
# steps of 2,048 tokens (the host's 8 micro-steps of one 256-token row), XSA on every block (the hybrid block 0
# included), the record's depth recurrence (block 1-2 looped from 35%) and parallel lanes (block 3). Cut for the CPU:
# the challenge's sp1024 tokenizer for the record's sp8192 (1,949 vs 1,497 tok/s over 20 steps) and MLP_MULT 2 for 4:
# a 200-step record run then took 189 s plain, 207 s hybrid, 2 threads (2.5 / 2.8 min training, ~30 s export, scoring
# and TTT); EMA_DECAY 0.92: the record's 0.9965 averages over ~285 steps, 6% of its ~4,500; the same
# share of 200 steps is ~13 steps (0.9965 would leave half the weight on the init); TTT_BATCH_SIZE 16 for 64 (its
# warmup runs a full batch of random rows); GPTQ_CALIBRATION_BATCHES 4 for 16; the val split cut (VAL_CUT)
SETTINGS = {
    "root": dict(NUM_LAYERS=4, MODEL_DIM=64, NUM_HEADS=4, NUM_KV_HEADS=2, MLP_MULT=2, TRAIN_SEQ_LEN=128, TRAIN_BATCH_TOKENS=4096,
                 VAL_BATCH_SIZE=65536, ITERATIONS=100, WARMDOWN_ITERS=25, WARMUP_STEPS=0, VAL_LOSS_EVERY=0, TRAIN_LOG_EVERY=25,
                 MAX_WALLCLOCK_SECONDS=0, VOCAB_SIZE=1024),
    "pr1493": dict(NUM_LAYERS=4, MODEL_DIM=128, EMBEDDING_DIM=128, NUM_HEADS=4, NUM_KV_HEADS=2, MLP_MULT=4, TRAIN_SEQ_LEN=128,
                   ROPE_TRAIN_SEQ_LEN=128, EVAL_SEQ_LEN=128, EVAL_STRIDE=64, TRAIN_BATCH_TOKENS=4096, VAL_BATCH_TOKENS=65536,
                   ITERATIONS=60, WARMUP_STEPS=0, VAL_LOSS_EVERY=0, TRAIN_LOG_EVERY=20, MAX_WALLCLOCK_SECONDS=0, NUM_LOOPS=1,
                   LOOP_START=1, LOOP_END=2, PARALLEL_RESIDUAL_START=3, XSA_LAST_N=4, ROPE_DIMS=16, GPTQ_CALIBRATION_BATCHES=4,
                   GPTQ_RESERVE_SECONDS=0, COMPRESSOR="lzma", VOCAB_SIZE=8192),
    "pr1493_64": dict(NUM_LAYERS=4, MODEL_DIM=256, EMBEDDING_DIM=256, NUM_HEADS=4, NUM_KV_HEADS=2, MLP_MULT=2, TRAIN_SEQ_LEN=256,
                      ROPE_TRAIN_SEQ_LEN=256, EVAL_SEQ_LEN=256, EVAL_STRIDE=128, TRAIN_BATCH_TOKENS=2048, VAL_BATCH_TOKENS=8192,
                      ITERATIONS=200, WARMUP_STEPS=0, VAL_LOSS_EVERY=0, TRAIN_LOG_EVERY=25, MAX_WALLCLOCK_SECONDS=0, NUM_LOOPS=1,
                      LOOP_START=1, LOOP_END=2, PARALLEL_RESIDUAL_START=3, XSA_LAST_N=4, ROPE_DIMS=16, EMA_DECAY=0.92,
                      GPTQ_CALIBRATION_BATCHES=4, GPTQ_RESERVE_SECONDS=0, COMPRESSOR="lzma", VOCAB_SIZE=1024),
    "record": dict(NUM_LAYERS=4, MODEL_DIM=256, NUM_HEADS=4, NUM_KV_HEADS=2, MLP_MULT=2, TRAIN_SEQ_LEN=256, ROPE_TRAIN_SEQ_LEN=256,
                   EVAL_SEQ_LEN=256, TTT_EVAL_SEQ_LEN=256, TRAIN_BATCH_TOKENS=2048, VAL_BATCH_TOKENS=8192, ITERATIONS=200,
                   WARMUP_STEPS=0, VAL_LOSS_EVERY=0, TRAIN_LOG_EVERY=25, MAX_WALLCLOCK_SECONDS=0, NUM_LOOPS=1, LOOP_START=1,
                   LOOP_END=2, PARALLEL_START_LAYER=3, XSA_LAST_N=4, ROPE_DIMS=16, EMA_DECAY=0.92, **RECORD_FEATURES,
                   TTT_BATCH_SIZE=16, GPTQ_CALIBRATION_BATCHES=4, GPTQ_RESERVE_SECONDS=0, COMPRESSOR="lzma", VOCAB_SIZE=1024),
}


# ----------------------------------------------------------------------------- bench-only variants of a host
# Each is a function of one host class, inlined into the run's copy with its call just before the host's
# `if __name__ == "__main__":` (so the script that ran holds it, and the record logs it with its source).

def dynamics_without_decay(Optimizers) -> None:
    """nodecay: after the host's Optimizers are built, the hybrid dynamics (every `.hymba.` parameter) leave the
    scalar AdamW's group for a group of their own with weight_decay 0 and the same learning rate; the host's
    other scalars keep ADAM_WD. Dynamics outside that group are an error (the host routed them elsewhere)."""
    host_init = Optimizers.__init__

    def __init__(self, h, base_model):
        host_init(self, h, base_model)
        dynamics = [p for name, p in base_model.named_parameters() if ".hymba." in name]
        [group] = self.optimizer_scalar.param_groups
        ids = {id(p) for p in dynamics}
        if not ids <= {id(p) for p in group["params"]}:
            raise RuntimeError("bench variant nodecay: some .hymba. parameters are not in the scalar AdamW group")
        group["params"] = [p for p in group["params"] if id(p) not in ids]
        if dynamics:
            self.optimizer_scalar.add_param_group(
                {"params": dynamics, "lr": group["lr"], "base_lr": group["base_lr"], "weight_decay": 0.0})

    Optimizers.__init__ = __init__


def xsa_on_attention_heads_only(Attention) -> None:
    """xsa-attn: in a hybrid attention module (one with `.hymba`), the host's XSA (`_xsa_efficient(y, v)`, each
    head's output less its component along its own KV head's value) runs on the attention heads (the first ones)
    only; the SSM heads' output (the last `hymba.heads`, on the last `hymba.kv_heads` values) passes unchanged.
    Every other attention module, and every call site (training, eval, the TTT blocks), keeps the host's XSA."""
    host_xsa = Attention._xsa_efficient

    def _xsa_efficient(self, y, v):
        heads = getattr(self, "hymba", None)
        if heads is None:
            return host_xsa(self, y, v)
        n_attn, n_kv = y.size(-2) - heads.heads, v.size(-2) - heads.kv_heads
        return torch.cat([host_xsa(self, y[..., :n_attn, :], v[..., :n_kv, :]), y[..., n_attn:, :]], dim=-2)

    Attention._xsa_efficient = _xsa_efficient


def heads_as_softmax_control(HybridHeads) -> None:
    """control: the hybrid layer's SSM heads stay softmax attention heads (each query sees its own document, as the
    host's varlen kernel does) with the same 4 identity-init taps on their values and no SSM dynamics: the
    attribution table's control row (bench/attribution_heads.py's ControlHeads, inlined above this function)."""
    hymba_layer.HybridHeads = ControlHeads  # the module's global, which build_and_swap_hymba_layers instantiates


# name -> (the function inlined and called on a host class, that class's name, what is inlined before the function)
VARIANTS = {"nodecay": (dynamics_without_decay, "Optimizers", []),
            "xsa-attn": (xsa_on_attention_heads_only, "CausalSelfAttention", []),
            "control": (heads_as_softmax_control, "HybridHeads",
                        [attribution_heads.conv_values, attribution_heads.softmax_heads, attribution_heads.ControlHeads])}
MAIN_GUARD = re.compile(r"""^if __name__ ?== ?(["'])__main__\1:""", re.M)


def variant_code(names: list[str]) -> str:
    """The named VARIANTS as module-level code: each function's source and its call on the host's class."""
    code = ""
    for name in names:
        fn, cls, support = VARIANTS[name]
        code += f"# bench-only variant {name} (bench/bench_hosts.py)\n"
        code += "".join(f"{inspect.getsource(obj)}\n" for obj in support + [fn]) + f"{fn.__name__}({cls})\n\n"
    return code


def with_variants(source: str, names: list[str]) -> str:
    """Plain host source with the named VARIANTS inlined before its main guard."""
    guards = [m.start() for m in MAIN_GUARD.finditer(source)]
    if len(guards) != 1:
        raise ValueError(f"bench variants: expected one `if __name__ == '__main__':` in the host, found {len(guards)}")
    return source[: guards[0]] + variant_code(names) + source[guards[0]:]


def family_runs(host: str) -> dict:
    """plain, hybrid with the module's defaults, and the hybrid with each bench variant."""
    return {host: (host, False, {}), f"{host}+hymba": (host, True, HYBRID),
            f"{host}+hymba nodecay": (host, True, HYBRID, ["nodecay"]),
            f"{host}+hymba xsa-attn": (host, True, HYBRID, ["xsa-attn"]),
            f"{host}+control": (host, True, HYBRID, ["control"])}


# name -> (script, patched, extra env[, bench variants])
RUNS = {
    "root": {"root": ("root", False, {}), "root+hymba": ("root", True, HYBRID),
             "this host": ("ours", False, {}), "this host+hymba": ("ours", False, HYBRID)},
    "pr1493": {"pr1493": ("pr1493", False, {}), "pr1493+hymba": ("pr1493", True, HYBRID)},
    "pr1493_64": family_runs("pr1493"),
    "record": family_runs("record"),
}
# family -> (val tokens kept, longest document kept) (cut_val): the evaluations read the whole val split, and phased
# TTT scores a batch of documents chunk by chunk (48 tokens, each with a backward over its window) for as many chunks as
# the batch's longest document has: on the full split (65k tokens, documents up to 11k) it alone took 239 s
VAL_CUT = {"pr1493_64": (16384, 1024), "record": (16384, 1024)}
THREADS = {"pr1493_64": 2, "record": 2}  # threads per run where OMP_NUM_THREADS is unset (else 1); runs never overlap
BOS_ID = 1  # the challenge tokenizers' BOS, which starts every document of the built-in shards
HOST_FILES = {"record": "record_0429_train_gpt.py"}  # host -> its file in ../shared/hosts/, where not NAME_train_gpt.py
# family -> [(key, score label in the log, column title)]; root's come from its own lines
SCORES = {
    "root": [("pre", None, "before quantization"), ("quant", None, "after int8+zlib roundtrip")],
    "pr1493": [("pre", "pre-quantization post-ema", "before quantization"), ("quant", "quantized", "after GPTQ int6 (`quantized`)"),
               ("sliding", "quantized_sliding_window", "GPTQ + sliding window")],
    "record": [("pre", "diagnostic pre-quantization post-ema", "pre-quantization (post-EMA)"),
               ("quant", "diagnostic quantized", "GPTQ-quantized"), ("ttt", "quantized_ttt_phased", "quantized + phased TTT")],
}
SCORES["pr1493_64"] = SCORES["pr1493"]
PAIRS = {"root": [("root+hymba", "root"), ("this host+hymba", "this host"), ("this host", "root"), ("this host+hymba", "root+hymba")]}
for _family, _host in (("pr1493", "pr1493"), ("pr1493_64", "pr1493"), ("record", "record")):
    _names = list(RUNS[_family])
    PAIRS[_family] = ([(n, _host) for n in _names[1:]] + [(n, f"{_host}+hymba") for n in _names if n.startswith(f"{_host}+hymba ")]
                      + [(f"{_host}+hymba", f"{_host}+control")])  # the SSM heads against their control
TRAIN_TOKS = re.compile(r"^\d+/\d+ train_loss: \S+ train_time: \S+ tok/s: (\d+)$", re.M)  # pr1493 and record


def build_data(family: str, cache: Path) -> dict[str, str]:
    """The built-in corpus in the layout each host reads; env entries pointing at it."""
    vocab = SETTINGS[family]["VOCAB_SIZE"]
    model = TOKENIZERS / f"fineweb_{vocab}_bpe.model"
    if not model.is_file():
        raise SystemExit(f"bench_hosts.py: {model} not found: the challenge's sp{vocab} tokenizer is needed")
    data, tokenizer = builtin_shards(cache / "datasets" / f"fineweb10B_sp{vocab}", cache / "tokenizers" / model.name, tokenizer=model)
    if family in VAL_CUT:
        limit, longest = VAL_CUT[family]
        data = cut_val(data, cache / "datasets" / f"fineweb10B_sp{vocab}_val{limit}_doc{longest}", limit, longest)
    return dict(DATA_PATH=str(data.resolve()), TOKENIZER_PATH=str(tokenizer.resolve()), DATA_DIR=f"{cache.resolve()}/")


def cut_val(data: Path, out: Path, limit: int, longest: int) -> Path:
    """A copy of the shards in `data` whose val split keeps, in file order, the whole documents (each starts at BOS,
    id 1) of at most `longest` tokens while they fit in `limit` tokens; written once."""
    if not (out / "fineweb_val_000000.bin").is_file():
        val = np.concatenate([read_shard(f) for f in sorted(data.glob("fineweb_val_*.bin"))])
        starts = np.flatnonzero(val == BOS_ID).tolist()
        docs, total = [], 0
        for a, b in zip(starts, starts[1:] + [val.size]):
            if b - a <= longest and total + b - a <= limit:
                docs.append(val[a:b])
                total += b - a
        if not docs:
            raise SystemExit(f"bench_hosts.py: no val document of at most {longest} tokens in {data}")
        out.mkdir(parents=True, exist_ok=True)
        for train in sorted(data.glob("fineweb_train_*.bin")):
            shutil.copyfile(train, out / train.name)
        write_shard(out / "fineweb_val_000000.bin", np.concatenate(docs))
    return out


def script_for(kind: str, patched: bool, folder: Path, variants: list[str] = ()) -> Path:
    """The CPU copy of host `kind` (patched by tools/patch_host.py, with bench variants) in folder/train_gpt.py."""
    if kind == "ours":
        return ROOT / "train_gpt.py"
    text = (HOSTS / HOST_FILES.get(kind, f"{kind}_train_gpt.py")).read_text(encoding="utf-8")
    if patched:
        text = patch_host.patch_text(text, patch_host.MODULE.read_text(encoding="utf-8"))
    if variants:
        if kind in host_cpu.SELF_EXTRACTING:
            source, payload = patch_host.unwrap(text)
            text = patch_host.wrap(text, payload, with_variants(source, list(variants)))
        else:
            text = with_variants(text, list(variants))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "train_gpt.py"
    path.write_text(host_cpu.cpu_copy(kind, text), encoding="utf-8")
    return path


def step_ms(family: str, log: Path) -> float | None:
    """Training ms per step from the host's last `tok/s` (training time only: validation and export excluded)."""
    found = TRAIN_TOKS.findall(log.read_text(encoding="utf-8", errors="replace")) if family != "root" else []
    return 1e3 * int(SETTINGS[family]["TRAIN_BATCH_TOKENS"]) / int(found[-1]) if found and int(found[-1]) > 0 else None


def threads(family: str) -> int:
    return int(os.environ.get("OMP_NUM_THREADS", THREADS.get(family, 1)))


def run_one(family: str, name: str, seed: int, data_env: dict, out: Path) -> dict:
    kind, patched, extra, *variants = RUNS[family][name]
    variants = variants[0] if variants else []
    folder = (out / "runs" / f"{name.replace(' ', '_').replace('+', '_')}_s{seed}").resolve()
    env = {**SETTINGS[family], **data_env, **extra, "SEED": seed, "TORCHDYNAMO_DISABLE": 1, "OMP_NUM_THREADS": threads(family)}
    labels = [label for _, label, _ in SCORES[family] if label]
    run = train_run(script_for(kind, patched, folder, variants), folder, env, f"{name} seed {seed}",
                    finished=lambda run: set(labels) <= {s[0] for s in run["scores"]})
    row = dict(name=name, seed=seed, params=run.get("model_params"), step_ms=step_ms(family, folder / "logs" / "run.txt"))
    if family == "root":
        [(_, _, pre, _)] = run["val"][-1:]
        return {**row, "pre": pre, "quant": run["roundtrip_exact"][1]}
    scores = {label: bpb for label, _, bpb, _ in run["scores"]}
    return {**row, **{key: scores[label] for key, label, _ in SCORES[family]}}


def table(family: str, runs: list[dict], seeds: list[int]) -> str:
    by = {(r["name"], r["seed"]): r for r in runs}
    names = [n for n in RUNS[family] if all((n, s) in by for s in seeds)]
    cols = [(key, title) for key, _, title in SCORES[family]]
    plain = names[0] if names and names[0] == list(RUNS[family])[0] else None
    timed = family != "root" and plain is not None
    lines = ["| run | params | " + " | ".join(f"val_bpb {c} (per seed)" for _, c in cols) + " | quantization gap |"
             + (" step time vs plain |" if timed else ""),
             "|---|---|" + "---|" * len(cols) + "---|" + ("---|" if timed else "")]
    for n in names:
        rs = [by[(n, s)] for s in seeds]
        cells = [", ".join(f"{r[k]:.4f}" for r in rs) for k, _ in cols]
        gap = statistics.fmean(r["quant"] - r["pre"] for r in rs)
        line = f"| {n} | {rs[0]['params']:,} | " + " | ".join(cells) + f" | {gap:+.4f} |"
        if timed:
            ratios = [by[(n, s)]["step_ms"] / by[(plain, s)]["step_ms"] for s in seeds]
            ms = statistics.fmean(r["step_ms"] for r in rs)
            line += f" {statistics.fmean(ratios):.2f}x ({ms:.0f} ms) |"
        lines.append(line)
    lines += ["", "Paired by seed (same data order and seed), mean ± half-range over seeds; lower is better:", "",
              "| comparison | " + " | ".join(f"Δ {c}" for _, c in cols) + " |", "|---|" + "---|" * len(cols)]
    for a, b in PAIRS[family]:
        if a not in names or b not in names:
            continue
        cells = []
        for k, _ in cols:
            d = [by[(a, s)][k] - by[(b, s)][k] for s in seeds]
            cells.append(f"{statistics.fmean(d):+.4f} ± {(max(d) - min(d)) / 2:.4f} ({sum(x < 0 for x in d)}/{len(d)} lower)")
        lines.append(f"| {a} - {b} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", required=True, choices=sorted(RUNS))
    p.add_argument("--seeds", default="1337,1338")
    p.add_argument("--runs", default="", help="comma-separated names of the family's runs (default: all)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a host env var for every run over the family's settings (repeatable), e.g. ITERATIONS=800")
    args = p.parse_args(argv)
    args.overrides = {}
    for item in args.set:
        key, eq, value = item.partition("=")
        if not (eq and re.fullmatch(r"[A-Z][A-Z0-9_]*", key) and value):
            p.error(f"--set {item!r}: expected KEY=VALUE with an upper-case env var name, e.g. ITERATIONS=800")
        args.overrides[key] = value
    try:
        args.seed_list = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        p.error(f"--seeds {args.seeds!r}: expected comma-separated integers, e.g. 1337,1338")
    if len(set(args.seed_list)) != len(args.seed_list):
        p.error(f"--seeds {args.seeds!r}: a seed repeats")
    names = list(RUNS[args.family])
    args.run_list = [n.strip() for n in args.runs.split(",")] if args.runs else names
    bad = [n for n in args.run_list if n not in names]
    if bad:
        p.error(f"--runs {', '.join(map(repr, bad))}: not a run of family {args.family}; its runs are {', '.join(names)}")
    args.run_list = [n for n in names if n in args.run_list]  # the family's order: plain first
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    SETTINGS[args.family].update(args.overrides)
    seeds = args.seed_list
    args.out.mkdir(parents=True, exist_ok=True)
    data_env = build_data(args.family, args.out / "cache")
    runs = [run_one(args.family, n, s, data_env, args.out) for s in seeds for n in args.run_list]
    settings = ", ".join(f"{k}={v}" for k, v in SETTINGS[args.family].items())
    picked = f" --runs '{args.runs}'" if args.runs else ""
    picked += "".join(f" --set {item}" for item in args.set)
    alone = ", one run at a time (TORCH_LOCK)" if os.environ.get("TORCH_LOCK") else ""
    cut = (f", val split cut to its documents of at most {VAL_CUT[args.family][1]} tokens, in file order, within "
           f"{VAL_CUT[args.family][0]:,} tokens" if args.family in VAL_CUT else "")
    used = {v for n in args.run_list for extra in RUNS[args.family][n][3:] for v in extra}
    variants = "".join(f"- `{name}`: {' '.join(inspect.getdoc(fn).split(': ', 1)[1].split())}\n"
                       for name, (fn, _, _) in VARIANTS.items() if name in used)
    text = (f"## hymba_layer.py in the {args.family} host: equal steps, {len(seeds)} seeds\n\n"
            f"Command: `{'TORCH_LOCK=' + os.environ['TORCH_LOCK'] + ' ' if alone else ''}python3 bench/bench_hosts.py --family {args.family} --seeds {args.seeds}{picked} --out {relative(args.out)}`\n\n"
            f"CPU, fp32, {threads(args.family)} thread(s) per run{alone}, built-in corpus with the challenge's "
            f"sp{SETTINGS[args.family]['VOCAB_SIZE']} tokenizer{cut}. Settings: {settings}; hybrid runs add HYMBA_LAYERS=0 "
            "(the module's defaults otherwise).\n\n"
            + (f"Bench-only variants of the hybrid run (inlined into the run's copy of the host):\n\n{variants}\n" if variants else "")
            + table(args.family, runs, seeds))
    (args.out / "results.md").write_text(text, encoding="utf-8")
    (args.out / "results.json").write_text(json.dumps(runs, indent=1), encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
