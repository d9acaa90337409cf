"""Does a hybrid's gain hold as training lengthens? One table and plot from several bench_quality.py runs.

    python3 bench/bench_summary.py bench/results/l9_steps200 bench/results/l9_steps400 \\
        --time bench/results/l9_time40 bench/results/l9_time160 --config layer0 --out bench/results/l9

Each folder is one budget (an --out of bench/bench_quality.py with the same configurations and seeds):
equal-steps folders give the paired per-seed Δ val_bpb (config minus its reference, same seed) at each
step count, as a curve; equal-time folders (MAX_WALLCLOCK_SECONDS) give it at each time budget, with the
steps each configuration reached. Writes <out>/results.md and <out>/curve.png.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path

from benchkit import relative  # first: it sets the import paths


def load(folder: Path, config: str) -> dict:
    """Per seed: the config's and its reference's final numbers, from bench_quality's results.json."""
    data = json.loads((folder / "results.json").read_text(encoding="utf-8"))
    rows = {r["config"]: r for r in data["rows"]}
    if config not in rows:
        raise SystemExit(f"bench_summary.py: {folder} has no configuration {config!r} (it has {', '.join(rows)})")
    ref = rows[config]["reference"]
    runs = {(r["config"], r["seed"]): r for r in data["runs"]}
    seeds = sorted(s for c, s in runs if c == config and (ref, s) in runs)
    return dict(folder=folder, reference=ref, seeds=seeds,
                pairs=[(runs[(config, s)], runs[(ref, s)]) for s in seeds])


def row(budget: str, b: dict) -> tuple[str, list[float]]:
    deltas = [h["val_bpb"] - r["val_bpb"] for h, r in b["pairs"]]
    steps = lambda i: statistics.fmean(p[i]["step_stop"] for p in b["pairs"])
    ms = lambda i: statistics.fmean(p[i]["train_ms"] / p[i]["step_stop"] for p in b["pairs"])
    cells = [budget, f"{steps(1):.0f} / {steps(0):.0f}", f"{ms(0) / ms(1):.2f}x",
             f"{statistics.fmean(p[1]['val_bpb'] for p in b['pairs']):.4f}", f"{statistics.fmean(p[0]['val_bpb'] for p in b['pairs']):.4f}",
             ", ".join(f"{d:+.4f}" for d in deltas),
             f"**{statistics.fmean(deltas):+.4f}** ({sum(d < 0 for d in deltas)}/{len(deltas)})"]
    return "| " + " | ".join(cells) + " |", deltas


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("steps", nargs="*", type=Path, help="equal-steps bench_quality folders")
    p.add_argument("--time", nargs="*", type=Path, default=[], help="equal-time bench_quality folders")
    p.add_argument("--config", default="layer0", help="the hybrid configuration (default: layer0)")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    budgets = [("steps", load(f, args.config)) for f in args.steps] + [("time", load(f, args.config)) for f in args.time]
    if not budgets:
        p.error("give at least one bench_quality folder")
    ref = budgets[0][1]["reference"]
    head = ["| budget | steps (ref / hybrid) | hybrid step time | val_bpb ref | val_bpb hybrid | Δ per seed | Δ mean (hybrid lower) |",
            "|---|---|---|---|---|---|---|"]
    lines = [f"## {args.config} vs {ref}: the paired gain as the budget grows", "",
             "Command: `python3 bench/bench_summary.py " + " ".join(map(relative, args.steps))
             + (" --time " + " ".join(map(relative, args.time)) if args.time else "") + f" --config {args.config} --out {relative(args.out)}`", "",
             "Δ: int8-roundtrip val_bpb of the hybrid minus the reference's with the same seed (negative = hybrid better). "
             "Each budget is its own set of runs with its warmdown fitted to it (a step count, or the challenge's "
             "MAX_WALLCLOCK_SECONDS cap). Per-budget commands and full tables: each folder's results.md.", ""]
    curves = {"steps": [], "time": []}
    for kind in ("steps", "time"):
        chosen = [b for k, b in budgets if k == kind]
        if not chosen:
            continue
        lines += [f"### Equal {kind}", "", *head]
        for b in chosen:
            if kind == "steps":
                x = b["pairs"][0][1]["step_stop"]
                label = f"{x} steps"
            else:  # the cap, as bench_quality.py's header states it
                x = float(re.search(r"trains for ([\d.]+) s", (b["folder"] / "results.md").read_text(encoding="utf-8"))[1])
                label = f"{x:g} s cap"
            text, deltas = row(label, b)
            lines.append(text)
            curves[kind].append((x, deltas))
        lines.append("")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    plot(curves, args.config, ref, args.out / "curve.png")
    print("\n".join(lines))
    return 0


def plot(curves: dict, config: str, ref: str, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = [k for k in ("steps", "time") if curves[k]]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.2), squeeze=False)
    for ax, kind in zip(axes[0], panels):
        xs = [x for x, _ in curves[kind]]
        for i in range(len(curves[kind][0][1])):
            ax.plot(xs, [d[i] for _, d in curves[kind]], marker="o", lw=1, alpha=0.6, label=f"seed {i + 1}")
        ax.plot(xs, [statistics.fmean(d) for _, d in curves[kind]], marker="s", color="black", lw=2.2, label="mean")
        ax.axhline(0, color="gray", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.set_xlabel("training steps (equal steps)" if kind == "steps" else "training seconds (equal time)")
        ax.set_ylabel(f"Δ val_bpb, {config} - {ref}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
