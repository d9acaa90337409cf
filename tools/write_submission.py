"""Write submission.json from one or more training logs (one per seed).

    python tools/write_submission.py train.log --out submission.json --author "Name" --github-id you \\
        --name "Hymba hybrid heads" --blurb "..." --dataset "FineWeb sp1024 (challenge shards)"

Every number comes from the logs: val_loss/val_bpb are the submitted scores (the mean over seeds
when several logs are given), pre-quant values are the last in-training validation (PR #1493
family: the `pre-quantization post-ema` score; the late-April record: `diagnostic pre-quantization
post-ema`), bytes are the logged artifact accounting (the record counts its code compressed). A log
without its final lines, or whose artifact is over 16,000,000 bytes, is refused. The file is
written atomically. Logs of this project's train_gpt.py, of the challenge's root script, of
PR #1493-family scripts and of the late-April record are read (tools/logparse.py); a log that names
no seed takes it from --seeds, given in log order, and one that names no GPU (the record logs no
nvidia-smi) from --gpu. `compliance` holds what the logs show (train and eval time, artifact
bytes, seeds); rules the logs cannot show (score-first TTT, no n-gram cache, ...) are the author's to
add. make_record.py builds a whole record folder on these functions.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from logparse import final_numbers, parse_log, score_label  # noqa: E402

ARTIFACT_LIMIT_BYTES = 16_000_000
TIME_LIMIT_SECONDS = 600  # training, and separately evaluation, on 8xH100 (README "FAQ")
RECORD_TRACK_MIN_SEEDS = 3  # README "Submission Process": significance over several runs, usually three
TRACKS = ("10min_16mb", "non-record-16mb", "non-record-unlimited-compute-16mb")


def seed_list(text: str) -> list[int]:
    """--seeds: comma-separated integers, one per log, in log order."""
    try:
        return [int(s) for s in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integer seeds (e.g. 1337,42,2025)") from None


def read_run(path: str, seed: int | None = None, gpu: str | None = None) -> dict:
    """One log's numbers for submission.json, or a ValueError naming the file and what is wrong.
    `seed` (from --seeds) stands in for a log that names none; it must agree with one that does.
    `gpu` (from --gpu) names the device of a log that names none."""
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such log file")
    run = parse_log(path)
    try:
        numbers = final_numbers(run)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    if numbers["bytes_total"] > ARTIFACT_LIMIT_BYTES:
        raise ValueError(f"{path}: artifact is {numbers['bytes_total']} bytes, over the {ARTIFACT_LIMIT_BYTES}-byte limit")
    if seed is not None and run.get("seed", seed) != seed:
        raise ValueError(f"{path}: the log says seed {run['seed']} but --seeds gives {seed}; give --seeds in log order, or leave it out")
    if seed is None and "seed" not in run:
        raise ValueError(f"{path}: the log names no seed ({run['family']} log); give one seed per log, in log order, "
                         "with --seeds (e.g. --seeds 1337,42,2025)")
    if "device" not in run and gpu:
        run["device"] = (gpu, None)
    if "device" not in run:
        raise ValueError(f"{path}: the log names no GPU ({run['family']} log); say which with --gpu (e.g. --gpu 'NVIDIA H100 80GB HBM3')")
    for key in ("world_size", "pytorch_version", "train_shards"):
        if key not in run:
            raise ValueError(f"{path}: the log has no '{key}' line; is it a training log (train_gpt.py, root or PR #1493 family)?")
    return {**numbers, "log": path, "family": run["family"], "score_label": score_label(run),
            "seed": run.get("seed", seed), "device": run["device"][0], "world_size": run["world_size"][0],
            "pytorch_version": run["pytorch_version"], "dataset_dir": run["train_shards"][0],
            "train_shards": run["train_shards"][1], "val_tokens": run.get("val_tokens", (None, None))[1],
            "hymba_layers": run["hymba_layers"], "hymba": hymba_settings(run),
            "artifact_wallclock": run.get("artifact_wallclock"), "code_bytes_uncompressed": run.get("code_bytes_uncompressed"),
            "unminified": "unminified" in run, "scores": run["scores"]}


def hymba_settings(run: dict) -> list[str]:
    """The `hymba:layer ...` lines of a log, one per hybrid layer (empty for a plain run)."""
    return list(run.get("hymba_lines", []))


def read_runs(paths: list[str], seeds: list[int] | None = None, gpu: str | None = None) -> list[dict]:
    """read_run of each log, with its seed from --seeds when given (one per log, in log order)."""
    if seeds is not None and len(seeds) != len(paths):
        raise ValueError(f"--seeds gives {len(seeds)} seeds ({seeds}) for {len(paths)} logs: give one seed per log, in log order")
    return [read_run(p, seed, gpu) for p, seed in zip(paths, seeds or [None] * len(paths))]


def compliance(runs: list[dict]) -> dict:
    """The R1493-style compliance flags that the logs show, each over every seed: training (and, in the
    record family, training plus GPTQ: its artifact_production_wallclock) and the scored evaluation
    within 600 s, the artifact within 16,000,000 bytes, at least three seeds."""
    train_s = lambda r: max(r["train_ms"] / 1000, r["artifact_wallclock"] or 0)
    return {"train_under_600s": all(train_s(r) <= TIME_LIMIT_SECONDS for r in runs),
            "artifact_under_16mb": all(r["bytes_total"] <= ARTIFACT_LIMIT_BYTES for r in runs),
            "eval_under_600s": all(r["eval_ms"] / 1000 <= TIME_LIMIT_SECONDS for r in runs),
            "three_seeds": len(runs) >= RECORD_TRACK_MIN_SEEDS}


def build_submission(runs: list[dict], meta: dict) -> dict:
    """submission.json's fields from read_runs' runs (the seeds of one configuration) and the
    author's meta: the scores are the means over seeds, single-run fields those of the first log."""
    seeds = [r["seed"] for r in runs]
    for i, run in enumerate(runs):
        if run["seed"] in seeds[:i]:
            twin = runs[seeds.index(run["seed"])]["log"]
            raise ValueError(f"logs repeat a seed: {twin} and {run['log']} are both seed {run['seed']}; give one log per seed")
    for key in ("family", "device", "world_size", "pytorch_version", "dataset_dir", "hymba_layers", "hymba"):
        if len({str(r[key]) for r in runs}) > 1:
            raise ValueError(f"logs disagree on {key}: {[r[key] for r in runs]}; they must be seeds of one configuration")
    mean = lambda key: statistics.fmean(r[key] for r in runs)
    first = runs[0]
    hardware = first["device"] if first["device"] == "cpu" else f"{first['world_size']}x{first['device']}"
    scheme = "quantized" if first["family"] in ("pr1493", "record") else "int8"  # as the log's bytes lines name it
    return {
        "author": meta["author"], "github_id": meta["github_id"], "name": meta["name"], "blurb": meta["blurb"],
        "date": meta["date"], "track": meta["track"],
        "val_loss": round(mean("val_loss"), 8), "val_bpb": round(mean("val_bpb"), 8),
        "val_bpb_std": round(statistics.stdev(r["val_bpb"] for r in runs), 8) if len(runs) > 1 else 0.0,
        "pre_quant_val_loss": round(mean("pre_quant_val_loss"), 8), "pre_quant_val_bpb": round(mean("pre_quant_val_bpb"), 8),
        "bytes_total": max(r["bytes_total"] for r in runs), "bytes_code": first["bytes_code"],
        f"bytes_model_{scheme}_{first['compressor']}": max(r["bytes_model"] for r in runs),
        "step_stop": first["step_stop"], "wallclock_seconds": round(first["train_ms"] / 1000, 3),
        "eval_time_seconds": round(first["eval_ms"] / 1000, 3),
        "hardware": hardware, "pytorch_version": first["pytorch_version"],
        "seeds": seeds,
        "seed_results": {str(r["seed"]): {"val_loss": r["val_loss"], "val_bpb": r["val_bpb"], "artifact_bytes": r["bytes_total"],
                                          "step_stop": r["step_stop"]} for r in runs},
        "hymba_layers": first["hymba_layers"],
        "compliance": compliance(runs),
        "dataset": meta["dataset"] or f"{first['dataset_dir']} ({first['train_shards']} train shards, {first['val_tokens']} val tokens)",
    }


def json_text(obj: dict) -> str:
    return json.dumps(obj, indent=2) + "\n"


def write_json_atomic(path: str, obj: dict) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(json_text(obj))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("logs", nargs="+", help="training log files, one per seed")
    p.add_argument("--out", default="submission.json", help="output path (default: submission.json)")
    p.add_argument("--author", required=True)
    p.add_argument("--github-id", required=True)
    p.add_argument("--name", required=True, help="short name of the submission")
    p.add_argument("--blurb", required=True, help="one paragraph: what it is and where the numbers come from")
    p.add_argument("--track", default="non-record-16mb", choices=TRACKS)
    p.add_argument("--date", default=datetime.date.today().isoformat(), help="YYYY-MM-DD (default: today)")
    p.add_argument("--dataset", default="", help="what data the run used (default: the shard folder named in the log)")
    p.add_argument("--seeds", type=seed_list, help="the seed of each log, in log order, for logs that name none (e.g. 1337,42,2025)")
    p.add_argument("--gpu", help="the GPU the runs used, for logs that name none (the record family's), e.g. 'NVIDIA H100 80GB HBM3'")
    args = p.parse_args(argv)
    try:
        datetime.date.fromisoformat(args.date)
        submission = build_submission(read_runs(args.logs, args.seeds, args.gpu), vars(args))
    except ValueError as e:
        print(f"write_submission.py: error: {e}", file=sys.stderr)
        return 2
    write_json_atomic(args.out, submission)
    print(f"wrote {args.out}: val_bpb {submission['val_bpb']} over seeds {submission['seeds']}, {submission['bytes_total']} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
