"""Read a training log (logs/<RUN_ID>.txt or its console output) into a dict of numbers.

Shared by bench_quality.py, write_submission.py and make_record.py. A log may start with the source
code; only the lines after the first row of 100 "=" are read, and a `Source code:` block is skipped, so
templates inside the source never match. Four families of logs are read, told apart by their lines
(`family` in parse_log's dict):

    train_gpt  this project's train_gpt.py: `device:... torch_compile:...`, `seed:N`, the score in
               `final_int8_<c>_roundtrip_exact val_loss:X val_bpb:Y`
    root       the challenge's root train_gpt.py: the same lines without `device:`
    pr1493     PR #1493's record script and the records built on it: a `Hyperparameters:` block
               (`  seed: 42`), scores as `{label} val_loss:X val_bpb:Y eval_time:Zms` (the last one
               is the submitted score), bytes as `... quantized+<c>: N bytes`
    record     the late-April record (record_0429: banked weights, phased LoRA TTT) and its kin: the
               pr1493 lines, scores labelled `diagnostic pre-quantization post-ema`, `diagnostic
               quantized` and `quantized_ttt_phased` (the submitted score), the code counted as
               `Code size (compressed): N bytes` (its lzma/b85 wrapper of the pyminified source)
"""
from __future__ import annotations

import re
from pathlib import Path

SEPARATOR = "=" * 100
VAL_LINE = re.compile(r"^step:(\d+)/(\d+) val_loss:([\d.]+) val_bpb:([\d.]+) train_time:(\d+)ms")
TRAIN_LINE = re.compile(r"^step:(\d+)/(\d+) train_loss:([\d.naif]+) train_time:(\d+)ms")
P1493_VAL_LINE = re.compile(r"^(\d+)/(\d+) val_loss: ([\d.]+) val_bpb: ([\d.]+)$")
P1493_TRAIN_LINE = re.compile(r"^(\d+)/(\d+) train_loss: ([\d.naif]+) train_time: ([\d.]+)m ")
SCORE_LINE = re.compile(r"^([a-z][\w -]*) val_loss:([\d.]+) val_bpb:([\d.]+) eval_time:(\d+)ms$")
HPARAM_LINE = re.compile(r"^  (\w+): (.*)$")
NVIDIA_SMI_GPU = re.compile(r"^\|\s+\d+\s+(\S.*?)\s+(?:On|Off)\s+\|")  # a GPU row of the nvidia-smi table
FIELDS = {  # key: (pattern, converters)
    "model_params": (r"^model_params:(\d+)", (int,)),
    "seed": (r"^seed:(-?\d+)", (int,)),
    "world_size": (r"^world_size:(\d+) grad_accum_steps:(\d+)", (int, int)),
    "device": (r"^device:(.+?) torch_compile:(\w+)", (str, str)),
    "pytorch_version": (r"^Running PyTorch (\S+)", (str,)),
    "train_shards": (r"^train_loader:dataset:(\S+) train_shards:(\d+)", (str, int)),
    "val_tokens": (r"^val_loader:shards pattern=(\S+) tokens:(\d+)", (str, int)),
    "stopped_early": (r"^stopping_early: wallclock_cap train_time: ?(\d+)ms step: ?(\d+)/", (int, int)),
    "model_bytes": (r"^Serialized model (?:int8|quantized)\+(\w+): (\d+) bytes", (str, int)),
    "code_bytes": (r"^Code size(?: \(compressed\))?: (\d+) bytes", (int,)),
    "code_bytes_uncompressed": (r"^Code size \(uncompressed\): (\d+) bytes", (int,)),
    "unminified": (r"^CPU test copy: (pyminify) not installed", (str,)),  # tools/host_cpu.py's copy, without pyminify
    "artifact_wallclock": (r"^artifact_production_wallclock: ([\d.]+)s", (float,)),
    "total_bytes": (r"^Total submission size (?:int8|quantized)\+\w+: (\d+) bytes", (int,)),
    "roundtrip": (r"^final_int8_\w+_roundtrip val_loss:[\d.]+ val_bpb:[\d.]+ eval_time:(\d+)ms", (int,)),
    "roundtrip_exact": (r"^final_int8_\w+_roundtrip_exact val_loss:([\d.]+) val_bpb:([\d.]+)", (float, float)),
    "hymba_layers": (r"^hymba:layer (\d+)", (int,)),
    "p1493_train_shards": (r"^train_shards: (\d+)$", (int,)),
    "p1493_val_tokens": (r"^val_tokens: (\d+)$", (int,)),
    "gpu": (NVIDIA_SMI_GPU.pattern, (str,)),
}
PRE_QUANT_LABEL = "pre-quantization post-ema"
RECORD_PRE_QUANT_LABEL = "diagnostic pre-quantization post-ema"
RECORD_HPARAM = "phased_ttt_num_phases"  # a Hyperparameters name of the record family only


def parse_log(path: str | Path) -> dict:
    """Numbers of one run. Keys always present: `family`, `val` [(step, val_loss, val_bpb, train_ms)],
    `train` [(step, train_loss, train_ms)], `iterations`, `scores` [(label, val_loss, val_bpb, eval_ms)],
    `hparams` {name: text}; the FIELDS keys when their line was logged (hymba_layers: a list of the
    swapped layer indices, hymba_lines their `hymba:layer` lines, each once). A pr1493 or record log's own
    lines are filed under the same keys (seed, world_size, train_shards, val_tokens; val lines carry
    train_ms None), and where no `device:` line was logged, `device` is the GPU the nvidia-smi table names."""
    lines = Path(path).read_text(encoding="utf-8", errors="replace").splitlines()
    if SEPARATOR in lines:
        lines = lines[lines.index(SEPARATOR) + 1 :]
    if "Source code:" in lines:  # the record family logs its source between two separators
        start = lines.index("Source code:")
        end = start + 2 + (lines[start + 2 :] + [SEPARATOR]).index(SEPARATOR)
        lines = lines[:start] + lines[end + 1 :]
    out: dict = {"val": [], "train": [], "iterations": None, "hymba_layers": [], "hymba_lines": [], "scores": [], "hparams": {}}
    in_hparams = False
    for line in lines:
        if in_hparams and (m := HPARAM_LINE.match(line)):
            out["hparams"][m[1]] = m[2]
            continue
        in_hparams = line == "Hyperparameters:"
        if m := VAL_LINE.match(line):
            out["val"].append((int(m[1]), float(m[3]), float(m[4]), int(m[5])))
            out["iterations"] = int(m[2])
            continue
        if m := TRAIN_LINE.match(line):
            out["train"].append((int(m[1]), float(m[3]), int(m[4])))
            out["iterations"] = int(m[2])
            continue
        if m := P1493_VAL_LINE.match(line):
            out["val"].append((int(m[1]), float(m[3]), float(m[4]), None))
            out["iterations"] = int(m[2])
            continue
        if m := P1493_TRAIN_LINE.match(line):
            out["train"].append((int(m[1]), float(m[3]), round(float(m[4]) * 60_000)))  # logged in minutes, 0.1 m steps
            out["iterations"] = int(m[2])
            continue
        if m := SCORE_LINE.match(line):
            out["scores"].append((m[1], float(m[2]), float(m[3]), int(m[4])))  # final_int8_*_roundtrip lands here too
        for key, (pattern, kinds) in FIELDS.items():
            if m := re.match(pattern, line):
                values = tuple(k(v) for k, v in zip(kinds, m.groups()))
                value = values[0] if len(values) == 1 else values
                if key == "hymba_layers":  # once per layer: the record logs them for every model it builds
                    if line not in out["hymba_lines"]:
                        out["hymba_lines"].append(line)
                        out[key].append(value)
                else:
                    out[key] = value
                break
    hparam_family = "record" if RECORD_HPARAM in out["hparams"] else "pr1493"
    out["family"] = hparam_family if out["hparams"] else "train_gpt" if "device" in out else "root"
    if out["family"] in ("pr1493", "record"):
        file_pr1493_lines(out)
    if "device" not in out and "gpu" in out:
        out["device"] = (out["gpu"], None)
    return out


def file_pr1493_lines(out: dict) -> None:
    """File what a pr1493 log says in its own words under the keys the other families use."""
    h = out["hparams"]
    if h.get("seed", "").lstrip("-").isdigit():
        out["seed"] = int(h["seed"])
    if h.get("world_size", "").isdigit() and h.get("grad_accum_steps", "").isdigit():
        out["world_size"] = (int(h["world_size"]), int(h["grad_accum_steps"]))
    if "p1493_train_shards" in out:
        out["train_shards"] = (Path(h.get("datasets_dir", "?")).name, out.pop("p1493_train_shards"))
    if "p1493_val_tokens" in out:
        out["val_tokens"] = (h.get("val_files", "?"), out.pop("p1493_val_tokens"))


def pre_quant_label(family: str) -> str:
    """The label of the EMA model's score before quantization in a pr1493 or record log."""
    return RECORD_PRE_QUANT_LABEL if family == "record" else PRE_QUANT_LABEL


def promised_scores(hparams: dict, family: str = "pr1493") -> list[str]:
    """The score labels a pr1493 or record run logs by its flags, in order (their train_and_eval)."""
    on = lambda flag: hparams.get(flag) == "True"
    if family == "record":
        return [RECORD_PRE_QUANT_LABEL, "diagnostic quantized"] + (["quantized_ttt_phased"] if on("ttt_enabled") else [])
    labels = [PRE_QUANT_LABEL, "quantized"]
    if on("sliding_window_enabled"):
        labels.append("quantized_sliding_window")
        labels += ["quantized_ttt"] if on("ttt_enabled") else []
        labels += ["quantized_sliding_etlb"] if on("etlb_enabled") else []
    return labels


def score_label(run: dict) -> str:
    """The label of the line a finished run's submitted val_bpb comes from."""
    if run["family"] in ("pr1493", "record"):
        return run["scores"][-1][0]
    return f"final_int8_{run['model_bytes'][0]}_roundtrip_exact"


def final_numbers(run: dict) -> dict:
    """The scored numbers of a finished run, or a ValueError saying which final line is missing."""
    if run.get("family") in ("pr1493", "record"):
        return final_numbers_pr1493(run)
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


def final_numbers_pr1493(run: dict) -> dict:
    """final_numbers of a pr1493 or record log: the score is the last score line, pre-quant the EMA model's
    score, the stop from `stopping_early` (else the last val line, and the last train line's time)."""
    code_line = "Code size (compressed)" if run["family"] == "record" else "Code size"
    for key, line in (("total_bytes", "Total submission size quantized+*"), ("model_bytes", "Serialized model quantized+*"),
                      ("code_bytes", code_line)):
        if key not in run:
            raise ValueError(f"the log has no '{line}' line: the run did not finish its export")
    scores = {label: (loss, bpb, ms) for label, loss, bpb, ms in run["scores"]}
    for label in promised_scores(run["hparams"], run["family"]):
        if label not in scores:
            raise ValueError(f"the log has no '{label} val_loss:... val_bpb:... eval_time:...ms' line: the run did not finish its evaluation")
    if "stopped_early" in run:
        train_ms, step = run["stopped_early"]
    elif run["val"] and run["train"]:
        step, train_ms = run["val"][-1][0], run["train"][-1][2]
    else:
        raise ValueError("the log has no 'stopping_early: ...' nor 'N/M val_loss: ...' line: the run never reached its stop")
    _, val_loss, val_bpb, eval_ms = run["scores"][-1]
    pre_loss, pre_bpb, _ = scores[pre_quant_label(run["family"])]
    return dict(val_loss=val_loss, val_bpb=val_bpb, pre_quant_val_loss=pre_loss, pre_quant_val_bpb=pre_bpb, step_stop=step,
                train_ms=train_ms, bytes_total=run["total_bytes"], bytes_code=run["code_bytes"],
                bytes_model=run["model_bytes"][1], compressor=run["model_bytes"][0], eval_ms=eval_ms)
