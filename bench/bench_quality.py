"""Quality benchmark: does a hybrid configuration beat the plain host at equal steps and at equal time?

Trains each configuration with identical hyperparameters, data and seeds by running train_gpt.py
(one subprocess per run, seed-major order so machine noise hits every configuration alike), then
writes a markdown table, a JSON file of every number and a plot (val_bpb against step and against
training time, one line per configuration, mean over seeds).

    python3 bench/bench_quality.py                                  # layer0 vs baseline, 2 seeds, CPU preset
    python3 bench/bench_quality.py --configs baseline,layer0,layer0_conv4 --seeds 1,2,3 --out bench/results/ablate

Data: the built-in corpus (tools/make_dataset.py), tokenized with the challenge's
fineweb_1024_bpe.model when ../shared/tokenizers/ has it (a tokenizer trained on the corpus
otherwise), or --data/--tokenizer for existing shards.

Equal steps is the default (ITERATIONS=200, no cap). Equal time is a separate run set with the
challenge's own mechanism, a training-time cap: `--set MAX_WALLCLOCK_SECONDS=70 --set ITERATIONS=100000`
gives every configuration the same seconds, with its warmdown fitted to them as the host schedules it.
(Reading a step-scheduled run's curve at a common time would compare one configuration mid-warmdown
with another near its end.) Timings are only as good as the machine is quiet.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from benchkit import RESULTS, ROOT, SHARED, relative, train_run  # first: it sets the import paths

from demo import CPU_PRESET
from logparse import final_numbers
from make_dataset import builtin_shards

SHARED_TOKENIZER = SHARED / "tokenizers" / "fineweb_1024_bpe.model"

PRESETS = {
    "cpu": CPU_PRESET,  # the demo's model on a CPU
    # the challenge's depth (9 blocks, U-Net skips), small enough for the equal-time budgets and the
    # 200/400/800-step curve on 2 cores (RESULTS.md)
    "l9": dict(NUM_LAYERS=9, MODEL_DIM=64, NUM_HEADS=4, NUM_KV_HEADS=2, MLP_MULT=2, TRAIN_SEQ_LEN=128,
               TRAIN_BATCH_TOKENS=2048, VAL_BATCH_SIZE=65536, ITERATIONS=200, WARMDOWN_ITERS=50, VAL_LOSS_EVERY=50),
    # the attribution table's model: the challenge's head size (64) and KV grouping (2 query heads per KV head)
    "attr": dict(NUM_LAYERS=4, MODEL_DIM=256, NUM_HEADS=4, NUM_KV_HEADS=2, MLP_MULT=2, TRAIN_SEQ_LEN=256,
                 TRAIN_BATCH_TOKENS=2048, VAL_BATCH_SIZE=65536, ITERATIONS=200, WARMDOWN_ITERS=50, VAL_LOSS_EVERY=50),
    "smoke": dict(NUM_LAYERS=3, MODEL_DIM=64, NUM_HEADS=4, NUM_KV_HEADS=2, MLP_MULT=2, TRAIN_SEQ_LEN=64,
                  TRAIN_BATCH_TOKENS=2048, VAL_BATCH_SIZE=8192, ITERATIONS=6, WARMDOWN_ITERS=2, VAL_LOSS_EVERY=3),
}
COMMON = dict(WARMUP_STEPS=0, MAX_WALLCLOCK_SECONDS=0, TRAIN_LOG_EVERY=50)

# name -> env overrides on top of the preset; every hybrid config is one change from its placement's plain hybrid.
CONFIGS = {
    "baseline": {},
    "layer0": dict(HYMBA_LAYERS="0"),
    "layer1": dict(HYMBA_LAYERS="1"),
    "layer2": dict(HYMBA_LAYERS="2"),
    "layer3": dict(HYMBA_LAYERS="3"),
    "layers01": dict(HYMBA_LAYERS="0,1"),
    "layers_all": dict(HYMBA_LAYERS="0,1,2,3"),
    "layer0_conv0": dict(HYMBA_LAYERS="0", HYMBA_CONV="0"),
    "layer0_conv2": dict(HYMBA_LAYERS="0", HYMBA_CONV="2"),
    "layer0_conv4": dict(HYMBA_LAYERS="0", HYMBA_CONV="4"),
    # the challenge's depth (9 blocks, U-Net skips) at the preset's width: block 4 is the middle one
    "l9_baseline": dict(NUM_LAYERS=9),
    "l9_layer0": dict(NUM_LAYERS=9, HYMBA_LAYERS="0"),
    "l9_layer4": dict(NUM_LAYERS=9, HYMBA_LAYERS="4"),
    # long context (books, equal time): the plain model at 256 and 1024 tokens against windowed hybrids at 4-8x
    # (T=2048 needs 8 x 2048 tokens per step: the preset's 8,192 is not a multiple)
    # attribution (preset attr; BENCH_HEADS runs bench/attribution_heads.py's head forms): each SSM row is paired
    # with the plain model and with the control, the same taps on softmax heads' values
    "a_baseline": {},
    "a_control": dict(HYMBA_LAYERS="0", BENCH_HEADS="control"),
    "a_ssm_notaps": dict(HYMBA_LAYERS="0", HYMBA_CONV="0"),
    "a_ssm": dict(HYMBA_LAYERS="0"),
    "a_parallel": dict(HYMBA_LAYERS="0", BENCH_HEADS="parallel"),
    "a_parallel_notaps": dict(HYMBA_LAYERS="0", HYMBA_CONV="0", BENCH_HEADS="parallel"),
    "a_ssm_mid": dict(HYMBA_LAYERS="2"),
    "a_ssm_last": dict(HYMBA_LAYERS="3"),
    "a_ssm_all": dict(HYMBA_LAYERS="0,1,2,3"),
    "a_control_all": dict(HYMBA_LAYERS="0,1,2,3", BENCH_HEADS="control"),
    # 1/4 vs 1/2 of the heads needs one KV head per query head (SSM heads take whole KV groups)
    "m_baseline": dict(NUM_KV_HEADS=4),
    "m_control": dict(NUM_KV_HEADS=4, HYMBA_LAYERS="0", HYMBA_SSM_HEADS="1", BENCH_HEADS="control"),
    "m_ssm_quarter": dict(NUM_KV_HEADS=4, HYMBA_LAYERS="0", HYMBA_SSM_HEADS="1"),
    "m_ssm_half": dict(NUM_KV_HEADS=4, HYMBA_LAYERS="0", HYMBA_SSM_HEADS="2"),
    "ctx_baseline": dict(TRAIN_SEQ_LEN=256),
    "ctx_t1024": dict(TRAIN_SEQ_LEN=1024),
    "ctx_layer0": dict(TRAIN_SEQ_LEN=256, HYMBA_LAYERS="0"),
    "ctx_hyall_t1024_w256": dict(TRAIN_SEQ_LEN=1024, HYMBA_LAYERS="0,1,2,3", HYMBA_WINDOW=256, EVAL_CARRY_STATE=1),
    "ctx_hyall_t2048_w256": dict(TRAIN_SEQ_LEN=2048, TRAIN_BATCH_TOKENS=16384, HYMBA_LAYERS="0,1,2,3", HYMBA_WINDOW=256, EVAL_CARRY_STATE=1),
    "ctx_hy02_t1024_w256": dict(TRAIN_SEQ_LEN=1024, HYMBA_LAYERS="0,2", HYMBA_WINDOW=256, EVAL_CARRY_STATE=1),
}


def build_data(cache: Path) -> tuple[Path, Path]:
    """Shards of the built-in corpus in `cache` (made once, reused), with the challenge's sp1024 tokenizer where
    ../shared/tokenizers/ has it (one trained on the corpus otherwise)."""
    return builtin_shards(cache / "datasets" / "builtin_sp1024", cache / "tokenizers" / "builtin_1024_bpe.model",
                          tokenizer=SHARED_TOKENIZER if SHARED_TOKENIZER.exists() else None)


def run_one(name: str, seed: int, env: dict, out: Path, reuse: bool) -> dict:
    script = ROOT / "bench" / "attribution_heads.py" if "BENCH_HEADS" in env else ROOT / "train_gpt.py"
    run = train_run(script, out / "runs" / f"{name}_s{seed}", {**env, "SEED": seed}, f"{name} seed {seed}",
                    finished=lambda run: reuse and "roundtrip_exact" in run)
    return {"config": name, "seed": seed, "curve": run["val"], "params": run["model_params"], **final_numbers(run)}


def mean_spread(values: list[float]) -> tuple[float, float]:
    """Mean and half the range (with 2 seeds, the distance from the mean to either seed)."""
    return statistics.fmean(values), (max(values) - min(values)) / 2


def reference(name: str, names: list[str]) -> str:
    """What a configuration is compared with: for a family with its own baseline, that one (l9_layer4 ->
    l9_baseline); for an option ablation (HYMBA_* settings only), the configuration with just its HYMBA_LAYERS
    (layer0_conv4 -> layer0); else `baseline`, else the first."""
    env, family = CONFIGS.get(name, {}), name.split("_")[0] + "_baseline"
    if family in names and family != name:
        return family
    if len(env) > 1 and all(k.startswith("HYMBA_") for k in env):
        plain = [n for n in names if CONFIGS.get(n) == {"HYMBA_LAYERS": env.get("HYMBA_LAYERS")}]
        if plain:
            return plain[0]
    for ref in (name.split("_")[0] + "_baseline", "baseline"):
        if ref in names and ref != name:
            return ref
    return name if name == "baseline" or name.endswith("_baseline") else names[0]


def summarize(runs: list[dict], names: list[str]) -> list[dict]:
    """Per configuration: mean ± half-range over seeds, and the paired difference to its reference
    (same seed, so the same initialization and data): mean ± half-range, and in how many seeds it is lower."""
    by = {n: {r["seed"]: r for r in runs if r["config"] == n} for n in names}
    step_ms = lambda rs: statistics.fmean(r["train_ms"] / r["step_stop"] for r in rs.values())
    rows = []
    for n, rs in by.items():
        ref_name = reference(n, names)
        ref = by[ref_name]
        paired = [r["val_bpb"] - ref[s]["val_bpb"] for s, r in rs.items() if s in ref]
        control = n.split("_")[0] + "_control"  # a family's control row, where it has one
        vs_control = [r["val_bpb"] - by[control][s]["val_bpb"] for s, r in rs.items()
                      if control in by and control != n and n != ref_name and s in by[control]]
        rows.append(dict(config=n, reference=ref_name, seeds=len(rs), params=next(iter(rs.values()))["params"],
                         bytes_total=max(r["bytes_total"] for r in rs.values()), steps=statistics.fmean(r["step_stop"] for r in rs.values()),
                         step_ms=step_ms(rs), step_ratio=step_ms(rs) / step_ms(ref),
                         pre=mean_spread([r["pre_quant_val_bpb"] for r in rs.values()]), post=mean_spread([r["val_bpb"] for r in rs.values()]),
                         delta=mean_spread(paired), wins=(sum(d < 0 for d in paired), len(paired)),
                         delta_control=mean_spread(vs_control) if vs_control else None,
                         wins_control=(sum(d < 0 for d in vs_control), len(vs_control))))
    return rows


def markdown(rows: list[dict], header: str) -> str:
    fmt = lambda ms: f"{ms[0]:.4f} ± {ms[1]:.4f}"
    delta = lambda r: "-" if r["reference"] == r["config"] else f"{r['delta'][0]:+.4f} ± {r['delta'][1]:.4f} ({r['wins'][0]}/{r['wins'][1]})"
    vs_control = lambda r: "-" if r.get("delta_control") is None else \
        f"{r['delta_control'][0]:+.4f} ± {r['delta_control'][1]:.4f} ({r['wins_control'][0]}/{r['wins_control'][1]})"
    controls = any(r.get("delta_control") is not None for r in rows)
    lines = [header, "",
             "val_bpb: mean ± half-range over seeds. Δ: the int8-roundtrip val_bpb minus the reference configuration's with the "
             "same seed (same initialization and data order), mean ± half-range, and (k/n) the seeds in which the configuration "
             "is lower (better). Step-time ratios are against the reference too."
             + (" Δ vs control: the same against the family's `_control` row, paired by seed." if controls else ""), "",
             "| config | vs | params | steps | step ms (ratio) | val_bpb pre-quant | val_bpb int8 roundtrip | Δ roundtrip |"
             + (" Δ vs control |" if controls else "") + " artifact bytes |",
             "|---|---|---|---|---|---|---|---|" + ("---|" if controls else "") + "---|"]
    for r in rows:
        lines.append(f"| {r['config']} | {r['reference']} | {r['params']:,} | {r['steps']:.0f} | {r['step_ms']:.0f} ({r['step_ratio']:.2f}x) | "
                     f"{fmt(r['pre'])} | {fmt(r['post'])} | {delta(r)} |" + (f" {vs_control(r)} |" if controls else "")
                     + f" {r['bytes_total']:,} |")
    return "\n".join(lines) + "\n"


def plot(runs: list[dict], names: list[str], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax_step, ax_time) = plt.subplots(1, 2, figsize=(13, 4.8))
    colors = plt.get_cmap("tab20").colors
    for i, n in enumerate(names):
        rs = [r for r in runs if r["config"] == n]
        k = min(len(r["curve"]) for r in rs)
        steps = [rs[0]["curve"][j][0] for j in range(k)]
        bpb = [statistics.fmean(r["curve"][j][2] for r in rs) for j in range(k)]
        secs = [statistics.fmean(r["curve"][j][3] for r in rs) / 1000 for j in range(k)]
        style = dict(color="black", lw=2.2) if n == "baseline" else dict(color=colors[i % 20], lw=1.2, ls=("-", "--", ":")[i // 20 % 3])
        ax_step.plot(steps, bpb, marker=".", label=n, **style)
        ax_time.plot(secs, bpb, marker=".", label=n, **style)
    for ax, xlabel in ((ax_step, "step"), (ax_time, "training time (s)")):
        ax.set_xlabel(xlabel)
        ax.set_ylabel("val_bpb (mean over seeds)")
        ax.grid(alpha=0.3)
        lo = min(statistics.fmean(r["curve"][-1][2] for r in runs if r["config"] == n) for n in names)
        ax.set_ylim(lo - 0.03, lo + 0.4)  # the second half of training, where configurations differ
    ax_time.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="baseline,layer0", help=f"comma-separated, from: {', '.join(CONFIGS)}")
    p.add_argument("--seeds", default="1337,1338", help="comma-separated seeds (default: 1337,1338)")
    p.add_argument("--preset", default="cpu", choices=sorted(PRESETS), help="model size and run length (default: cpu)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra env var for every run (repeatable)")
    p.add_argument("--data", type=Path, help="shard folder (default: the built-in corpus, built into --out/cache)")
    p.add_argument("--tokenizer", type=Path, help="tokenizer .model for --data")
    p.add_argument("--out", type=Path, default=RESULTS / "quality", help="output folder (default: bench/results/quality)")
    p.add_argument("--reuse", action="store_true", help="keep finished runs already in --out/runs")
    args = p.parse_args(argv)

    names = [n for n in args.configs.split(",") if n]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown or not names:
        p.error(f"--configs {args.configs!r}: unknown {unknown}; valid: {', '.join(CONFIGS)}")
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s]
    except ValueError:
        p.error(f"--seeds {args.seeds!r}: expected comma-separated integers")
    extra = dict(kv.split("=", 1) for kv in args.set if "=" in kv)
    if len(extra) != len(args.set):
        p.error(f"--set {args.set}: expected KEY=VALUE")
    if (args.data is None) != (args.tokenizer is None):
        p.error("--data and --tokenizer go together")
    args.out.mkdir(parents=True, exist_ok=True)
    data, tokenizer = (args.data, args.tokenizer) if args.data else build_data(args.out / "cache")

    base_env = {**PRESETS[args.preset], **COMMON, **extra, "DATA_PATH": data.resolve(), "TOKENIZER_PATH": tokenizer.resolve()}
    runs = []
    for seed in seeds:
        for n in names:
            runs.append(run_one(n, seed, {**base_env, **CONFIGS[n]}, args.out, args.reuse))
    rows = summarize(runs, names)
    same_as_challenge = SHARED_TOKENIZER.exists() and tokenizer.read_bytes() == SHARED_TOKENIZER.read_bytes()
    settings = {**PRESETS[args.preset], **COMMON, **extra}
    budget = (f"equal time: every run trains for {settings['MAX_WALLCLOCK_SECONDS']} s" if float(settings["MAX_WALLCLOCK_SECONDS"]) > 0
              else f"equal steps: every run trains {settings['ITERATIONS']} steps")
    header = (f"## Quality, {budget}: {', '.join(names)} ({len(seeds)} seeds, preset `{args.preset}`)\n\n"
              f"Command: `python3 bench/bench_quality.py --configs {args.configs} --seeds {args.seeds} --preset {args.preset}"
              + "".join(f" --set {kv}" for kv in args.set) + (f" --data {args.data} --tokenizer {args.tokenizer}" if args.data else "")
              + f" --out {relative(args.out)}`\n\n"
              f"Data: `{data.name}` (tokenizer `{tokenizer.name}`{', the challenge sp1024 model' if same_as_challenge else ''}). "
              f"Settings: {', '.join(f'{k}={v}' for k, v in settings.items())}.")
    table = markdown(rows, header)
    (args.out / "results.md").write_text(table, encoding="utf-8")
    (args.out / "results.json").write_text(json.dumps({"rows": rows, "runs": runs}, indent=1), encoding="utf-8")
    plot(runs, names, args.out / "quality.png")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
