"""Assemble the folder a leaderboard PR adds, from the finished runs (one log per seed) of one script.

    python tools/make_record.py logs/s1337.txt logs/s42.txt logs/s2025.txt --script train_gpt.py \\
        --track 10min_16mb --name HymbaHybridHeads --author "Your Name" --github-id you \\
        --blurb "Hybrid attention+SSM heads in layer 4 of the baseline" [--date 2026-05-04] [--out records]

writes records/track_10min_16mb/2026-05-04_HymbaHybridHeads/ (the non-record tracks go to
records/track_non_record_16mb/) holding:
  train_gpt.py          a copy of --script
  hymba_layer.py        the module beside --script, only when the script imports it; not when the
                        module is inlined (tools/patch_host.py) or the script is an lzma/b85 wrapper
  submission.json       what tools/write_submission.py writes from the same logs
  train_seed<N>.log     each log
  train.log             the first log given: the run whose single-run numbers submission.json
                        reports (step_stop, wallclock_seconds, eval_time_seconds, bytes_code)
  README.md             the blurb, a per-seed results table with mean and std (and, in the PR #1493
                        and record families, every score line per seed), the hybrid settings (the
                        logs' `hymba:layer` lines), how the code bytes were counted, the command used

Logs of this project's train_gpt.py, the challenge's root script, PR #1493-family scripts and the
late-April record (record_0429: `diagnostic ...` and `quantized_ttt_phased` scores, the last one the
submitted score) are read (tools/logparse.py); a log that names no seed takes it from --seeds, given
in log order, one that names no GPU (the record's) from --gpu. Code bytes are checked against the
code that ships: the UTF-8 size of the script (and the module it imports), or in the record family,
which counts `Code size (compressed)`: the lzma/b85 wrapper of the pyminified script, its
`Code size (uncompressed)` against the script's UTF-8 size and the compressed size recomputed as the
record computes it (pyminify, lzma, base85; the plain code where the log says pyminify was not
installed; where pyminify is not installed here, the README says the compressed size was not
rechecked). Refused with exit code 2, one line on stderr and nothing written: an unfinished log, an
artifact over 16,000,000 bytes, a code size that is not the code that would ship, a repeated seed,
fewer than three seeds on the 10min_16mb track, and a folder that exists already (unless --force).
The folder is built beside its target and renamed into place.
"""
from __future__ import annotations

import argparse
import base64
import datetime
import lzma
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from logparse import pre_quant_label  # noqa: E402
from write_submission import (ARTIFACT_LIMIT_BYTES, RECORD_TRACK_MIN_SEEDS, TRACKS, build_submission, json_text,  # noqa: E402
                              read_runs, seed_list)

TRACK_DIRS = {"10min_16mb": "track_10min_16mb", "non-record-16mb": "track_non_record_16mb",
              "non-record-unlimited-compute-16mb": "track_non_record_16mb"}
# the record's _compressed_code_size: pyminify with these flags, lzma, base85, inside this exec wrapper
PYMINIFY = ["pyminify", "--no-rename-locals", "--no-hoist-literals", "--remove-literal-statements", "-"]
WRAPPER = (b'import lzma as L,base64 as B\nexec(L.decompress(B.b85decode("', b'")))\n')
MODULE = "hymba_layer.py"
INLINED_MARKER = "# ---- hymba_layer.py inlined"  # tools/patch_host.py's first line of the inlined module
SELF_EXTRACTING = re.compile(r"exec\(\s*[\w.]*decompress\(\s*[\w.]*b85decode\(")  # PR #1493's wrapper
IMPORTS_MODULE = re.compile(r"^[ \t]*(?:import[ \t]+hymba_layer\b|from[ \t]+hymba_layer[ \t]+import\b)", re.M)
FOLDER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def shipped_code(script: Path, hybrid: bool) -> dict[str, Path]:
    """The code files of the record, by their name in its folder: the script as train_gpt.py, and
    hymba_layer.py from beside it when the runs used hybrid layers (`hybrid`) and the script imports
    the module instead of carrying it (this project's train_gpt.py imports it only when asked to)."""
    source = script.read_text(encoding="utf-8")
    carries_module = SELF_EXTRACTING.search(source) or any(line.startswith(INLINED_MARKER) for line in source.splitlines())
    if carries_module or not hybrid or not IMPORTS_MODULE.search(source):
        return {"train_gpt.py": script}
    module = script.parent / MODULE
    if not module.is_file():
        raise ValueError(f"{script}: imports hymba_layer but {module} does not exist; put the module beside the script, "
                         "or inline it with tools/patch_host.py")
    return {"train_gpt.py": script, MODULE: module}


def code_bytes(path: Path) -> int:
    """A source file's size as the scripts count their own code: UTF-8 bytes of its text."""
    return len(path.read_text(encoding="utf-8").encode("utf-8"))


def wrapped_size(source: str, minify: bool) -> int:
    """The record family's compressed code size of `source`: its (pyminified) UTF-8 bytes, lzma-compressed,
    base85-encoded, inside the exec wrapper; the byte count the record adds to its model's."""
    raw = source.encode("utf-8")
    if minify:
        raw = subprocess.run(PYMINIFY, input=raw, capture_output=True, check=True).stdout
    return len(WRAPPER[0] + base64.b85encode(lzma.compress(raw)) + WRAPPER[1])


def check_record_code_size(runs: list[dict], code: dict[str, Path]) -> str:
    """A record-family log counts its script compressed: `Code size (uncompressed)` must be the script's UTF-8
    size and `Code size (compressed)` its wrapped size; returns how the compressed size was checked (README)."""
    script = code["train_gpt.py"]
    if len(code) > 1:
        raise ValueError(f"{script}: imports {MODULE}, which the record's 'Code size' leaves out (it counts its own file); "
                         "inline the module with tools/patch_host.py")
    source = script.read_text(encoding="utf-8")
    plain = len(source.encode("utf-8"))
    for run in runs:
        if run["code_bytes_uncompressed"] != plain:
            raise ValueError(f"{run['log']}: logs 'Code size (uncompressed): {run['code_bytes_uncompressed']} bytes' but {script} is "
                             f"{plain} bytes; give --script the script the run used")
    minifier = shutil.which(PYMINIFY[0])
    sizes: dict[bool, int] = {}
    for run in runs:
        minify = not run["unminified"]
        if minify and not minifier:
            continue
        size = sizes.setdefault(minify, wrapped_size(source, minify))
        if run["bytes_code"] != size:
            how = "pyminify, lzma, base85" if minify else "lzma, base85; the log says pyminify was not installed"
            raise ValueError(f"{run['log']}: logs 'Code size (compressed): {run['bytes_code']} bytes' but {script} wrapped as the record "
                             f"wraps it ({how}) is {size} bytes here; give --script the script the run used")
    skipped = [str(r["seed"]) for r in runs if not r["unminified"] and not minifier]
    if skipped:
        return (f"`Code size (uncompressed)` matches the script's {plain:,} UTF-8 bytes in every log; the compressed size of seed(s) "
                f"{', '.join(skipped)} was not recomputed: pyminify (python-minifier) is not installed where this folder was made")
    how = "pyminify, then lzma and base85" if True in sizes else "lzma and base85 of the unminified code: these runs had no pyminify"
    return (f"`Code size (uncompressed)` matches the script's {plain:,} UTF-8 bytes and `Code size (compressed)` its wrapped size "
            f"recomputed as the record computes it ({how}) in every log")


def check_code_size(runs: list[dict], code: dict[str, Path]) -> str:
    """Each log's `Code size` must be the code that ships, or its artifact size is not this record's; returns
    how it was checked (README)."""
    if runs[0]["family"] == "record":
        return check_record_code_size(runs, code)
    sizes = {name: code_bytes(path) for name, path in code.items()}
    shipped = sum(sizes.values())
    for run in runs:
        if run["bytes_code"] != shipped:
            parts = " + ".join(f"{name} {size}" for name, size in sizes.items())
            raise ValueError(f"{run['log']}: logs 'Code size: {run['bytes_code']} bytes' but the code that would ship is {shipped} bytes "
                             f"({parts}); give --script the script the run used (with the {MODULE} it ran with beside it)")
    return f"`Code size` is the UTF-8 size of the code that ships ({shipped:,} bytes) in every log"


def results_table(runs: list[dict]) -> str:
    """Markdown: one row per seed, then the mean and the sample std over seeds of each column."""
    columns = [  # (header, a run's value, format of a seed's value, format of the mean and std)
        ("steps", lambda r: r["step_stop"], "{:,}", "{:,.1f}"),
        ("train time (s)", lambda r: r["train_ms"] / 1000, "{:.3f}", "{:.3f}"),
        ("pre-quant val_bpb", lambda r: r["pre_quant_val_bpb"], "{:.8f}", "{:.8f}"),
        ("final val_bpb", lambda r: r["val_bpb"], "{:.8f}", "{:.8f}"),
        ("artifact bytes", lambda r: r["bytes_total"], "{:,}", "{:,.1f}"),
    ]
    row = lambda cells: "| " + " | ".join(cells) + " |"
    lines = [row(["seed", *(header for header, *_ in columns)]), row(["---:"] * (len(columns) + 1))]
    lines += [row([str(r["seed"]), *(fmt.format(value(r)) for _, value, fmt, _ in columns)]) for r in runs]
    lines.append(row(["mean", *(fmt.format(statistics.fmean(value(r) for r in runs)) for _, value, _, fmt in columns)]))
    if len(runs) > 1:
        lines.append(row(["std", *(fmt.format(statistics.stdev(value(r) for r in runs)) for _, value, _, fmt in columns)]))
    return "\n".join(lines)


def scores_table(runs: list[dict]) -> str:
    """Markdown: every score line of each seed's log (label: val_bpb), in the log's order, and the means."""
    labels = list(dict.fromkeys(label for r in runs for label, *_ in r["scores"]))
    bpb = [{label: b for label, _, b, _ in r["scores"]} for r in runs]
    cell = lambda values: f"{statistics.fmean(values):.8f}" if values else "-"
    row = lambda cells: "| " + " | ".join(cells) + " |"
    lines = [row(["seed", *(f"`{label}`" for label in labels)]), row(["---:"] * (len(labels) + 1))]
    lines += [row([str(r["seed"]), *(cell([s[label]] if label in s else []) for label in labels)]) for r, s in zip(runs, bpb)]
    lines.append(row(["mean", *(cell([s[label] for s in bpb if label in s]) for label in labels)]))
    return "\n".join(lines)


def hybrid_section(runs: list[dict]) -> str:
    """The hybrid settings, as the module logged them (one `hymba:layer` line per hybrid layer)."""
    lines = runs[0]["hymba"]
    if lines:
        return ("Hybrid attention+SSM heads (`hymba_layer.py`), as every log reports them, one line per hybrid layer:\n\n```\n"
                + "\n".join(lines) + "\n```")
    return "The logs have no `hymba:layer` line: the runs had no hybrid layers (`HYMBA_LAYERS` unset)."


def readme(submission: dict, runs: list[dict], code: dict[str, Path], command: str, code_check: str) -> str:
    """The record's README.md: the blurb, the headline numbers, the results table, the files, the command."""
    first = runs[0]
    labels = ", ".join(f"`{label}`" for label in dict.fromkeys(r["score_label"] for r in runs))
    scored = first["family"] in ("pr1493", "record")
    pre_quant = f"the `{pre_quant_label(first['family'])}` score" if scored else "the last in-training validation"
    code_files = f"`train_gpt.py` and `{MODULE}`, which it imports" if MODULE in code else "`train_gpt.py`"
    counted = ("the lzma/base85 wrapper of the pyminified script, as the record counts its code (`Code size (compressed)`); "
               f"the shipped script is {first['code_bytes_uncompressed']:,} bytes") if first["family"] == "record" else "as the logs count it"
    all_scores = f"\n\nEvery score line, val_bpb per seed:\n\n{scores_table(runs)}" if scored else ""
    return f"""# {submission['name']}

{submission['blurb']}

- **val_bpb {submission['val_bpb']:.8f}** (std {submission['val_bpb_std']:.8f}) over seeds {', '.join(map(str, submission['seeds']))}; track `{submission['track']}`
- artifact at most {submission['bytes_total']:,} bytes (limit {ARTIFACT_LIMIT_BYTES:,}): code {submission['bytes_code']:,} + compressed model
- {submission['hardware']}, PyTorch {submission['pytorch_version']}; data: {submission['dataset']}
- {submission['author']} (@{submission['github_id']}), {submission['date']}

## Results

{results_table(runs)}

final val_bpb: the {labels} line of each log, the submitted score; pre-quant val_bpb: {pre_quant}; std: the sample
standard deviation over seeds. Every number is read from the logs.{all_scores}

## Hybrid settings

{hybrid_section(runs)}

## Files

- {code_files}: the code, {submission['bytes_code']:,} bytes, {counted}. Checked: {code_check}
- `train_seed<seed>.log`: each run's log; `train.log` is `train_seed{first['seed']}.log`, the first log given, the run
  that submission.json's single-run fields (step_stop, wallclock_seconds, eval_time_seconds) describe
- `submission.json`

## How this folder was made

```
{command}
```
"""


def plan_record(args: argparse.Namespace, command: str) -> tuple[Path, dict[str, bytes]]:
    """Every check, then the record folder's path and its files; a ValueError for what is refused."""
    if not FOLDER_NAME.match(args.name):
        raise ValueError(f"--name {args.name!r}: it names the folder <date>_<name>; use letters, digits, '_', '-' and '.'")
    try:
        datetime.date.fromisoformat(args.date)
    except ValueError:
        raise ValueError(f"--date {args.date!r} is not a date: give YYYY-MM-DD") from None
    target = Path(args.out) / TRACK_DIRS[args.track] / f"{args.date}_{args.name}"
    if target.exists() and not args.force:
        raise ValueError(f"{target}: already exists; remove it, pick another --name or --date, or pass --force to replace it")
    script = Path(args.script)
    if not script.is_file():
        raise ValueError(f"{script}: no such script; --script names the train_gpt.py the runs used")
    runs = read_runs(args.logs, args.seeds, args.gpu)
    code = shipped_code(script, any(run["hymba_layers"] for run in runs))
    code_check = check_code_size(runs, code)
    submission = build_submission(runs, vars(args))
    if args.track == "10min_16mb" and len(runs) < RECORD_TRACK_MIN_SEEDS:
        raise ValueError(f"{', '.join(args.logs)}: the 10min_16mb track needs at least {RECORD_TRACK_MIN_SEEDS} seeds, these logs give "
                         f"{len(runs)} ({submission['seeds']}); add the logs of more seeds, or use --track non-record-16mb")
    files = {name: path.read_bytes() for name, path in code.items()}
    files["submission.json"] = json_text(submission).encode("utf-8")
    files |= {f"train_seed{run['seed']}.log": Path(run["log"]).read_bytes() for run in runs}
    files["train.log"] = files[f"train_seed{runs[0]['seed']}.log"]
    files["README.md"] = readme(submission, runs, code, command, code_check).encode("utf-8")
    return target, files


def write_folder(target: Path, files: dict[str, bytes]) -> None:
    """Write the files into a folder beside target, then rename it into place (replacing target)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    replaced = target.with_name(f".{target.name}.replaced{os.getpid()}")
    try:
        tmp.mkdir()
        for name, data in files.items():
            (tmp / name).write_bytes(data)
        if target.exists():  # only with --force
            target.rename(replaced)
        tmp.rename(target)
    finally:
        for leftover in (tmp, replaced):
            if leftover.exists():
                shutil.rmtree(leftover)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("logs", nargs="+", help="training log files, one per seed")
    p.add_argument("--script", required=True, help="the train_gpt.py the runs used (hymba_layer.py, if imported, is taken from beside it)")
    p.add_argument("--track", required=True, choices=TRACKS)
    p.add_argument("--name", required=True, help="short name: the folder is <date>_<name>, and submission.json's name")
    p.add_argument("--author", required=True)
    p.add_argument("--github-id", required=True)
    p.add_argument("--blurb", required=True, help="one paragraph: what it is; it heads the README and goes into submission.json")
    p.add_argument("--date", default=datetime.date.today().isoformat(), help="YYYY-MM-DD (default: today)")
    p.add_argument("--out", default="records", help="the records folder (default: records)")
    p.add_argument("--seeds", type=seed_list, help="the seed of each log, in log order, for logs that name none (e.g. 1337,42,2025)")
    p.add_argument("--gpu", help="the GPU the runs used, for logs that name none (the record family's), e.g. 'NVIDIA H100 80GB HBM3'")
    p.add_argument("--dataset", default="", help="what data the runs used (default: the shard folder named in the logs)")
    p.add_argument("--force", action="store_true", help="replace the folder if it exists")
    args = p.parse_args(argv)
    try:
        target, files = plan_record(args, shlex.join(["python", "tools/make_record.py", *argv]))
    except ValueError as e:
        print(f"make_record.py: error: {e}", file=sys.stderr)
        return 2
    write_folder(target, files)
    print(f"wrote {target}/: {', '.join(sorted(files))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
