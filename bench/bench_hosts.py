"""hymba_layer.py inside the challenge's own hosts, at equal steps, paired by seed, on the CPU.

    python3 bench/bench_hosts.py --family root --seeds 1337,1338 --out bench/results/hosts_root
    python3 bench/bench_hosts.py --family pr1493 --seeds 1337,1338 --out bench/results/hosts_pr1493

root: per seed, four runs with the same settings and data: the challenge's root train_gpt.py (a CPU
copy, tests/host_cpu.py), the same patched with HYMBA_LAYERS=0 (tools/patch_host.py), this project's
train_gpt.py, and it with HYMBA_LAYERS=0. The table shows the hybrid's gain in each host and how
closely the two hosts agree (so this project's results transfer to root-based scripts).
pr1493: per seed, the PR #1493 record script (CPU copy) plain and patched with HYMBA_LAYERS=0: its
post-EMA score before GPTQ, after GPTQ int6 (`quantized`) and sliding-window, so the table shows the
hybrid's gain and each one's quantization gap.

Data: the built-in corpus (tools/make_dataset.py) tokenized with the challenge's sp1024 / sp8192
models from ../shared/tokenizers/ (or --tokenizer). Not FineWeb, and fp32 on the CPU (host_cpu.py
says why): numbers compare configurations, they are not leaderboard scores.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

from benchkit import ROOT, SHARED, relative, train_run  # first: it sets the import paths

import host_cpu
import patch_host
from make_dataset import builtin_shards

HOSTS = SHARED / "hosts"
TOKENIZERS = SHARED / "tokenizers"
HYBRID = {"HYMBA_LAYERS": "0"}  # block 0, the placement the previous design measured best (RESULTS.md)

# settings both hosts read with the same meaning; small enough for 2 CPU cores
SETTINGS = {
    "root": dict(NUM_LAYERS=4, MODEL_DIM=64, NUM_HEADS=4, NUM_KV_HEADS=2, MLP_MULT=2, TRAIN_SEQ_LEN=128, TRAIN_BATCH_TOKENS=4096,
                 VAL_BATCH_SIZE=65536, ITERATIONS=100, WARMDOWN_ITERS=25, WARMUP_STEPS=0, VAL_LOSS_EVERY=0, TRAIN_LOG_EVERY=25,
                 MAX_WALLCLOCK_SECONDS=0, VOCAB_SIZE=1024),
    "pr1493": dict(NUM_LAYERS=4, MODEL_DIM=128, EMBEDDING_DIM=128, NUM_HEADS=4, NUM_KV_HEADS=2, MLP_MULT=4, TRAIN_SEQ_LEN=128,
                   ROPE_TRAIN_SEQ_LEN=128, EVAL_SEQ_LEN=128, EVAL_STRIDE=64, TRAIN_BATCH_TOKENS=4096, VAL_BATCH_TOKENS=65536,
                   ITERATIONS=60, WARMUP_STEPS=0, VAL_LOSS_EVERY=0, TRAIN_LOG_EVERY=20, MAX_WALLCLOCK_SECONDS=0, NUM_LOOPS=1,
                   LOOP_START=1, LOOP_END=2, PARALLEL_RESIDUAL_START=3, XSA_LAST_N=4, ROPE_DIMS=16, GPTQ_CALIBRATION_BATCHES=4,
                   GPTQ_RESERVE_SECONDS=0, COMPRESSOR="lzma", VOCAB_SIZE=8192),
}
# name -> (script, patched, extra env)
RUNS = {
    "root": {"root": ("root", False, {}), "root+hymba": ("root", True, HYBRID),
             "this host": ("ours", False, {}), "this host+hymba": ("ours", False, HYBRID)},
    "pr1493": {"pr1493": ("pr1493", False, {}), "pr1493+hymba": ("pr1493", True, HYBRID)},
}


def build_data(family: str, cache: Path) -> dict[str, str]:
    """The built-in corpus in the layout each host reads; env entries pointing at it."""
    vocab = SETTINGS[family]["VOCAB_SIZE"]
    model = TOKENIZERS / f"fineweb_{vocab}_bpe.model"
    if not model.is_file():
        raise SystemExit(f"bench_hosts.py: {model} not found: the challenge's sp{vocab} tokenizer is needed")
    data, tokenizer = builtin_shards(cache / "datasets" / f"fineweb10B_sp{vocab}", cache / "tokenizers" / model.name, tokenizer=model)
    return dict(DATA_PATH=str(data.resolve()), TOKENIZER_PATH=str(tokenizer.resolve()), DATA_DIR=f"{cache.resolve()}/")


def script_for(kind: str, patched: bool, folder: Path) -> Path:
    if kind == "ours":
        return ROOT / "train_gpt.py"
    text = (HOSTS / f"{kind}_train_gpt.py").read_text(encoding="utf-8")
    if patched:
        text = patch_host.patch_text(text, patch_host.MODULE.read_text(encoding="utf-8"))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "train_gpt.py"
    path.write_text(host_cpu.cpu_copy(kind, text), encoding="utf-8")
    return path


def run_one(family: str, name: str, seed: int, data_env: dict, out: Path) -> dict:
    kind, patched, extra = RUNS[family][name]
    folder = (out / "runs" / f"{name.replace(' ', '_').replace('+', '_')}_s{seed}").resolve()
    env = {**SETTINGS[family], **data_env, **extra, "SEED": seed, "TORCHDYNAMO_DISABLE": 1, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", 1)}
    run = train_run(script_for(kind, patched, folder), folder, env, f"{name} seed {seed}", finished=lambda run: bool(run["scores"]))
    scores = {label: bpb for label, _, bpb, _ in run["scores"]}
    if family == "pr1493":
        return dict(name=name, seed=seed, pre=scores["pre-quantization post-ema"], quant=scores["quantized"],
                    sliding=scores.get("quantized_sliding_window"), params=run.get("model_params"))
    [(_, _, pre, _)] = run["val"][-1:]
    return dict(name=name, seed=seed, pre=pre, quant=run["roundtrip_exact"][1], sliding=None, params=run.get("model_params"))


def table(family: str, runs: list[dict], seeds: list[int]) -> str:
    names = list(RUNS[family])
    by = {(r["name"], r["seed"]): r for r in runs}
    cols = [("pre", "before quantization"), ("quant", "after int8+zlib roundtrip" if family == "root" else "after GPTQ int6 (`quantized`)")]
    if family == "pr1493":
        cols.append(("sliding", "GPTQ + sliding window"))
    lines = ["| run | params | " + " | ".join(f"val_bpb {c} (per seed)" for _, c in cols) + " | quantization gap |",
             "|---|---|" + "---|" * len(cols) + "---|"]
    for n in names:
        rs = [by[(n, s)] for s in seeds]
        cells = [", ".join(f"{r[k]:.4f}" for r in rs) for k, _ in cols]
        gap = statistics.fmean(r["quant"] - r["pre"] for r in rs)
        lines.append(f"| {n} | {rs[0]['params']:,} | " + " | ".join(cells) + f" | {gap:+.4f} |")
    pairs = [("root+hymba", "root"), ("this host+hymba", "this host"), ("this host", "root"), ("this host+hymba", "root+hymba")] \
        if family == "root" else [("pr1493+hymba", "pr1493")]
    lines += ["", "Paired by seed (same data order and seed), mean ± half-range over seeds:", "",
              "| comparison | " + " | ".join(f"Δ {c}" for _, c in cols) + " |", "|---|" + "---|" * len(cols)]
    for a, b in pairs:
        cells = []
        for k, _ in cols:
            d = [by[(a, s)][k] - by[(b, s)][k] for s in seeds]
            cells.append(f"{statistics.fmean(d):+.4f} ± {(max(d) - min(d)) / 2:.4f} ({sum(x < 0 for x in d)}/{len(d)} lower)")
        lines.append(f"| {a} - {b} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", required=True, choices=sorted(RUNS))
    p.add_argument("--seeds", default="1337,1338")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    data_env = build_data(args.family, args.out / "cache")
    runs = [run_one(args.family, n, s, data_env, args.out) for s in seeds for n in RUNS[args.family]]
    settings = ", ".join(f"{k}={v}" for k, v in SETTINGS[args.family].items())
    text = (f"## hymba_layer.py in the {args.family} host: equal steps, {len(seeds)} seeds\n\n"
            f"Command: `python3 bench/bench_hosts.py --family {args.family} --seeds {args.seeds} --out {relative(args.out)}`\n\n"
            f"CPU, fp32, one thread per run, built-in corpus with the challenge's sp{SETTINGS[args.family]['VOCAB_SIZE']} "
            f"tokenizer. Settings: {settings}; hybrid runs add HYMBA_LAYERS=0.\n\n" + table(args.family, runs, seeds))
    (args.out / "results.md").write_text(text, encoding="utf-8")
    (args.out / "results.json").write_text(json.dumps(runs, indent=1), encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
