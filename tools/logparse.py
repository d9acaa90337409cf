"""Read a train_gpt.py log (logs/<RUN_ID>.txt or its console output) into a dict of numbers.

Shared by bench_quality.py and write_submission.py. The log starts with the source code; only the
lines after the first row of 100 "=" are read, so templates inside the source never match.
"""
from __future__ import annotations

import re
from pathlib import Path

SEPARATOR = "=" * 100
VAL_LINE = re.compile(r"^step:(\d+)/(\d+) val_loss:([\d.]+) val_bpb:([\d.]+) train_time:(\d+)ms")
TRAIN_LINE = re.compile(r"^step:(\d+)/(\d+) train_loss:([\d.naif]+) train_time:(\d+)ms")
FIELDS = {  # key: (pattern, converters)
    "model_params": (r"^model_params:(\d+)", (int,)),
    "seed": (r"^seed:(-?\d+)", (int,)),
    "world_size": (r"^world_size:(\d+) grad_accum_steps:(\d+)", (int, int)),
    "device": (r"^device:(.+?) torch_compile:(\w+)", (str, str)),
    "pytorch_version": (r"^Running PyTorch (\S+)", (str,)),
    "train_shards": (r"^train_loader:dataset:(\S+) train_shards:(\d+)", (str, int)),
    "val_tokens": (r"^val_loader:shards pattern=(\S+) tokens:(\d+)", (str, int)),
    "stopped_early": (r"^stopping_early: wallclock_cap train_time:(\d+)ms step:(\d+)/", (int, int)),
    "model_bytes": (r"^Serialized model int8\+(\w+): (\d+) bytes", (str, int)),
    "code_bytes": (r"^Code size: (\d+) bytes", (int,)),
    "total_bytes": (r"^Total submission size int8\+\w+: (\d+) bytes", (int,)),
    "roundtrip": (r"^final_int8_\w+_roundtrip val_loss:[\d.]+ val_bpb:[\d.]+ eval_time:(\d+)ms", (int,)),
    "roundtrip_exact": (r"^final_int8_\w+_roundtrip_exact val_loss:([\d.]+) val_bpb:([\d.]+)", (float, float)),
    "hymba_layers": (r"^hymba:layer (\d+)", (int,)),
}


def parse_log(path: str | Path) -> dict:
    """Numbers of one run. Keys always present: `val` [(step, val_loss, val_bpb, train_ms)], `train`
    [(step, train_loss, train_ms)], `iterations`; the FIELDS keys when their line was logged
    (hymba_layers: a list of the swapped layer indices)."""
    lines = Path(path).read_text(encoding="utf-8", errors="replace").splitlines()
    if SEPARATOR in lines:
        lines = lines[lines.index(SEPARATOR) + 1 :]
    out: dict = {"val": [], "train": [], "iterations": None, "hymba_layers": []}
    for line in lines:
        if m := VAL_LINE.match(line):
            out["val"].append((int(m[1]), float(m[3]), float(m[4]), int(m[5])))
            out["iterations"] = int(m[2])
            continue
        if m := TRAIN_LINE.match(line):
            out["train"].append((int(m[1]), float(m[3]), int(m[4])))
            out["iterations"] = int(m[2])
            continue
        for key, (pattern, kinds) in FIELDS.items():
            if m := re.match(pattern, line):
                values = tuple(k(v) for k, v in zip(kinds, m.groups()))
                value = values[0] if len(values) == 1 else values
                if key == "hymba_layers":
                    out[key].append(value)
                else:
                    out[key] = value
                break
    return out


def final_numbers(run: dict) -> dict:
    """The scored numbers of a finished run, or a ValueError saying which final line is missing."""
    for key, line in (("roundtrip_exact", "final_int8_*_roundtrip_exact"), ("total_bytes", "Total submission size int8+*"),
                      ("model_bytes", "Serialized model int8+*"), ("code_bytes", "Code size"), ("roundtrip", "final_int8_*_roundtrip")):
        if key not in run:
            raise ValueError(f"the log has no '{line}' line: the run did not finish its export and roundtrip")
    if not run["val"]:
        raise ValueError("the log has no 'step:N/M val_loss:... val_bpb:...' line: the run never validated")
    step, pre_loss, pre_bpb, train_ms = run["val"][-1]
    return dict(val_loss=run["roundtrip_exact"][0], val_bpb=run["roundtrip_exact"][1], pre_quant_val_loss=pre_loss,
                pre_quant_val_bpb=pre_bpb, step_stop=step, train_ms=train_ms, bytes_total=run["total_bytes"],
                bytes_code=run["code_bytes"], bytes_model=run["model_bytes"][1], compressor=run["model_bytes"][0],
                eval_ms=run["roundtrip"])
