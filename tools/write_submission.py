"""Write submission.json from one or more train_gpt.py logs (one per seed).

    python tools/write_submission.py train.log --out submission.json --author "Name" --github-id you \\
        --name "Hymba hybrid heads" --blurb "..." --dataset "FineWeb sp1024 (challenge shards)"

Every number comes from the logs: val_loss/val_bpb are the int8 roundtrip scores (the mean over
seeds when several logs are given), pre-quant values are the last in-training validation, bytes
are the logged artifact accounting. A log without its final lines, or whose artifact is over
16,000,000 bytes, is refused. The file is written atomically.
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
from logparse import final_numbers, parse_log  # noqa: E402

ARTIFACT_LIMIT_BYTES = 16_000_000
TRACKS = ("10min_16mb", "non-record-16mb", "non-record-unlimited-compute-16mb")


def read_run(path: str) -> dict:
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such log file")
    run = parse_log(path)
    try:
        numbers = final_numbers(run)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    if numbers["bytes_total"] > ARTIFACT_LIMIT_BYTES:
        raise ValueError(f"{path}: artifact is {numbers['bytes_total']} bytes, over the {ARTIFACT_LIMIT_BYTES}-byte limit")
    for key in ("seed", "device", "world_size", "pytorch_version", "train_shards"):
        if key not in run:
            raise ValueError(f"{path}: the log has no '{key}' line; is it a train_gpt.py log?")
    return {**numbers, "seed": run["seed"], "device": run["device"][0], "world_size": run["world_size"][0],
            "pytorch_version": run["pytorch_version"], "dataset_dir": run["train_shards"][0],
            "train_shards": run["train_shards"][1], "val_tokens": run.get("val_tokens", (None, None))[1],
            "hymba_layers": run["hymba_layers"]}


def build_submission(paths: list[str], meta: dict) -> dict:
    runs = [read_run(p) for p in paths]
    seeds = [r["seed"] for r in runs]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"logs repeat a seed ({seeds}): give one log per seed")
    for key in ("device", "world_size", "pytorch_version", "dataset_dir", "hymba_layers"):
        if len({str(r[key]) for r in runs}) > 1:
            raise ValueError(f"logs disagree on {key}: {[r[key] for r in runs]}; they must be seeds of one configuration")
    mean = lambda key: statistics.fmean(r[key] for r in runs)
    first = runs[0]
    hardware = first["device"] if first["device"] == "cpu" else f"{first['world_size']}x{first['device']}"
    return {
        "author": meta["author"], "github_id": meta["github_id"], "name": meta["name"], "blurb": meta["blurb"],
        "date": meta["date"], "track": meta["track"],
        "val_loss": round(mean("val_loss"), 8), "val_bpb": round(mean("val_bpb"), 8),
        "val_bpb_std": round(statistics.stdev(r["val_bpb"] for r in runs), 8) if len(runs) > 1 else 0.0,
        "pre_quant_val_loss": round(mean("pre_quant_val_loss"), 8), "pre_quant_val_bpb": round(mean("pre_quant_val_bpb"), 8),
        "bytes_total": max(r["bytes_total"] for r in runs), "bytes_code": first["bytes_code"],
        f"bytes_model_int8_{first['compressor']}": max(r["bytes_model"] for r in runs),
        "step_stop": first["step_stop"], "wallclock_seconds": round(first["train_ms"] / 1000, 3),
        "eval_time_seconds": round(first["eval_ms"] / 1000, 3),
        "hardware": hardware, "pytorch_version": first["pytorch_version"],
        "seeds": seeds,
        "seed_results": {str(r["seed"]): {"val_loss": r["val_loss"], "val_bpb": r["val_bpb"], "artifact_bytes": r["bytes_total"],
                                          "step_stop": r["step_stop"]} for r in runs},
        "hymba_layers": first["hymba_layers"],
        "dataset": meta["dataset"] or f"{first['dataset_dir']} ({first['train_shards']} train shards, {first['val_tokens']} val tokens)",
    }


def write_json_atomic(path: str, obj: dict) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("logs", nargs="+", help="train_gpt.py log files, one per seed")
    p.add_argument("--out", default="submission.json", help="output path (default: submission.json)")
    p.add_argument("--author", required=True)
    p.add_argument("--github-id", required=True)
    p.add_argument("--name", required=True, help="short name of the submission")
    p.add_argument("--blurb", required=True, help="one paragraph: what it is and where the numbers come from")
    p.add_argument("--track", default="non-record-16mb", choices=TRACKS)
    p.add_argument("--date", default=datetime.date.today().isoformat(), help="YYYY-MM-DD (default: today)")
    p.add_argument("--dataset", default="", help="what data the run used (default: the shard folder named in the log)")
    args = p.parse_args(argv)
    try:
        datetime.date.fromisoformat(args.date)
        submission = build_submission(args.logs, vars(args))
    except ValueError as e:
        print(f"write_submission.py: error: {e}", file=sys.stderr)
        return 2
    write_json_atomic(args.out, submission)
    print(f"wrote {args.out}: val_bpb {submission['val_bpb']} over seeds {submission['seeds']}, {submission['bytes_total']} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
