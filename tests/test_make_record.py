"""tools/make_record.py on synthetic logs of three families it reads (this project's train_gpt.py, the
challenge's root script, PR #1493's record script), written line by line from their log templates
(golf_conventions 3.8, 4.3, 5.4), and on the logs that the CPU copy of the patched late-April record
writes (three seeds): the folder it builds, the numbers in it, the records' submission.json schema, and
each refusal."""
import base64
import json
import lzma
import pathlib
import re
import shutil
import subprocess
import sys
import uuid

import pytest
import torch

from conftest import REPO

import make_record
import patch_host
from hosts import host_env, write_script
from test_host_record import TINY, data_dir  # noqa: F401 (the record's tiny shape; data_dir: its sp8192 data, a fixture)

META = ["--author", "Test Author", "--github-id", "tester", "--blurb", "Hybrid heads in layer 4.", "--date", "2026-05-04"]
SCRIPT = "import torch\n\ndef build():\n    import hymba_layer\n    return hymba_layer\n"
MODULE = '"""The hybrid layer."""\nSTATE = 16\n'
# seed: (steps, train_ms, pre-quant val_loss, val_bpb, roundtrip val_loss, val_bpb, artifact bytes)
RUNS = {1337: (13780, 600038, 2.0606, 1.2172, 2.07269931, 1.22436570, 15_863_489),
        42: (13801, 600012, 2.0599, 1.2168, 2.07210012, 1.22401234, 15_862_001),
        2025: (13765, 600051, 2.0617, 1.2179, 2.07398765, 1.22512345, 15_864_777)}
NVIDIA_SMI = "|   0  NVIDIA H100 80GB HBM3          On  |   00000000:18:00.0 Off |                    0 |"
# what hymba_layer.build_and_swap_hymba_layers logs for each swapped layer (here layer 4)
HYMBA_LINE = "hymba:layer 4 attn_heads:4 ssm_heads:4 kv_heads:4 head_dim:64 chunk:64 conv:0 window:0 params:268"


def int8_log(seed: int, code: int, source: str, *, family: str = "train_gpt", seed_line: bool = True, hybrid: bool = True) -> str:
    """A log of this project's train_gpt.py or (family="root") of the root script, ending in the int8 roundtrip;
    a hybrid run (the default) logs its `hymba:layer` line after the separator, a baseline run (hybrid=False) none."""
    steps, train_ms, pre_loss, pre_bpb, loss, bpb, total = RUNS[seed]
    ours = family == "train_gpt"
    lines = [source, "=" * 100, "Running Python 3.11.9", "Running PyTorch 2.13.0+cu128", "" if ours else NVIDIA_SMI, "=" * 100,
             *([HYMBA_LINE] if hybrid else []),
             "val_bpb:enabled tokenizer_kind=sentencepiece tokenizer_path=./data/tokenizers/fineweb_1024_bpe.model",
             "train_loader:dataset:fineweb10B_sp1024 train_shards:80",
             "val_loader:shards pattern=./data/datasets/fineweb10B_sp1024/fineweb_val_*.bin tokens:62021632",
             "model_params:17059912", "world_size:8 grad_accum_steps:1",
             *(["device:NVIDIA H100 80GB HBM3 torch_compile:True autocast_bf16:True"] if ours else []),
             *([f"seed:{seed}"] if seed_line else []),
             "step:0/20000 val_loss:6.9370 val_bpb:4.0978 train_time:0ms step_avg:0.01ms",
             "step:1/20000 train_loss:6.9357 train_time:43ms step_avg:43.00ms",
             f"step:{steps}/20000 val_loss:{pre_loss:.4f} val_bpb:{pre_bpb:.4f} train_time:{train_ms}ms step_avg:43.54ms",
             f"stopping_early: wallclock_cap train_time:{train_ms}ms step:{steps}/20000",
             "peak memory allocated: 10184 MiB reserved: 10442 MiB",
             "Serialized model: 67224983 bytes", f"Code size: {code} bytes", f"Total submission size: {67224983 + code} bytes",
             f"Serialized model int8+zlib: {total - code} bytes (payload:17178912 raw_torch:17224025 payload_ratio:3.91x)",
             f"Total submission size int8+zlib: {total} bytes",
             f"final_int8_zlib_roundtrip val_loss:{loss:.4f} val_bpb:{bpb:.4f} eval_time:1401ms",
             f"final_int8_zlib_roundtrip_exact val_loss:{loss:.8f} val_bpb:{bpb:.8f}"]
    return "\n".join(lines) + "\n"


# seed: (steps, train_ms, post-ema val_bpb, quantized, sliding window, ttt val_bpb, artifact bytes)
P1493_RUNS = {42: (4550, 588047, 1.08734790, 1.09970431, 1.08286335, 1.08079352, 15_991_930),
              314: (4557, 588102, 1.08741002, 1.09981234, 1.08271234, 1.08103456, 15_992_919),
              999: (4555, 588088, 1.08750123, 1.09990012, 1.08265432, 1.08118765, 15_993_232)}


def pr1493_log(seed: int, code: int, *, ttt: bool = True) -> str:
    """A PR #1493-family log: Hyperparameters block, GPTQ export, four scores (no source at the top)."""
    steps, train_ms, ema, quantized, sliding, ttt_bpb, total = P1493_RUNS[seed]
    hparams = {"compressor": "brotli", "datasets_dir": "./data/datasets/fineweb10B_sp8192", "etlb_enabled": False,
               "grad_accum_steps": 1, "seed": seed, "sliding_window_enabled": True, "ttt_enabled": ttt,
               "val_files": "./data/datasets/fineweb10B_sp8192/fineweb_val_*.bin", "world_size": 8}
    lines = ["=" * 100, "Hyperparameters:", *(f"  {k}: {v}" for k, v in hparams.items()), "=" * 100,
             "Running Python 3.12.3", "Running PyTorch 2.9.1+cu128", NVIDIA_SMI, "=" * 100,
             "train_shards: 128", "val_tokens: 40540160", "model_params:35944536", "gptq:reserving 12s, effective=588000ms",
             "warmup_step: 1/20", "0/20000 val_loss: 9.0109 val_bpb: 3.4884",
             "4000/20000 train_loss: 2.8123 train_time: 8.6m tok/s: 6080000",
             f"{steps}/20000 val_loss: 2.8119 val_bpb: 1.0886",
             f"stopping_early: wallclock_cap train_time: {train_ms}ms step: {steps}/20000",
             "peak memory allocated: 39045 MiB reserved: 39500 MiB", "ema:applying EMA weights",
             f"pre-quantization post-ema val_loss:2.80888888 val_bpb:{ema:.8f} eval_time:7012ms",
             "Serialized model: 135431033 bytes", f"Code size: {code} bytes",
             "GPTQ:collecting Hessians from calibration data...", "GPTQ:collected 66 Hessians in 11.0s",
             "Quantized weights:", "  gptq (int6): blocks.0.attn.c_q, blocks.0.mlp.fc",
             f"Serialized model quantized+brotli: {total - code} bytes", f"Total submission size quantized+brotli: {total} bytes",
             f"quantized val_loss:2.84100000 val_bpb:{quantized:.8f} eval_time:8123ms",
             f"quantized_sliding_window val_loss:2.79700000 val_bpb:{sliding:.8f} eval_time:121034ms"]
    if ttt:
        lines += ["ttt:start chunks=1238 ttt_lr=0.005 ttt_epochs=3",
                  f"quantized_ttt val_loss:2.79200000 val_bpb:{ttt_bpb:.8f} eval_time:366512ms"]
    return "\n".join(lines) + "\n"


@pytest.fixture
def work(tmp_path, monkeypatch):
    """A run folder: train_gpt.py importing hymba_layer.py beside it, and a records folder to fill."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "train_gpt.py").write_text(SCRIPT)
    (tmp_path / "hymba_layer.py").write_text(MODULE)
    return tmp_path


def write_logs(folder: pathlib.Path, texts: dict) -> list[str]:
    (folder / "logs").mkdir(exist_ok=True)
    paths = []
    for seed, text in texts.items():
        (folder / "logs" / f"s{seed}.txt").write_text(text)
        paths.append(f"logs/s{seed}.txt")
    return paths


def make(*args: str) -> int:
    return make_record.main([*args, *META])


def refused(capsys, message: str) -> None:
    err = capsys.readouterr().err
    assert message in err and err.startswith("make_record.py: error: ") and err.count("\n") == 1, err
    assert not pathlib.Path("records").exists()


CODE = len(SCRIPT.encode()) + len(MODULE.encode())  # what ships with an importing script
FOLDER = pathlib.Path("records/track_10min_16mb/2026-05-04_HymbaHybridHeads")
RECORD = ["--script", "train_gpt.py", "--track", "10min_16mb", "--name", "HymbaHybridHeads"]


def test_three_seeds_make_a_complete_record_folder(work):
    logs = write_logs(work, {seed: int8_log(seed, CODE, SCRIPT + MODULE) for seed in RUNS})
    assert make(*logs, *RECORD) == 0
    assert sorted(p.name for p in FOLDER.iterdir()) == ["README.md", "hymba_layer.py", "submission.json", "train.log", "train_gpt.py",
                                                        "train_seed1337.log", "train_seed2025.log", "train_seed42.log"]
    assert (FOLDER / "train_gpt.py").read_text() == SCRIPT and (FOLDER / "hymba_layer.py").read_text() == MODULE
    assert (FOLDER / "train_seed42.log").read_text() == (work / "logs" / "s42.txt").read_text()
    assert (FOLDER / "train.log").read_text() == (work / "logs" / "s1337.txt").read_text()  # the first log given
    sub = json.loads((FOLDER / "submission.json").read_text())
    assert sub["seeds"] == [1337, 42, 2025] and sub["track"] == "10min_16mb" and sub["name"] == "HymbaHybridHeads"
    assert sub["val_bpb"] == 1.2245005 and sub["val_bpb_std"] == 0.00056769  # (1.22436570 + 1.22401234 + 1.22512345) / 3
    assert sub["val_loss"] == round((2.07269931 + 2.07210012 + 2.07398765) / 3, 8)
    assert sub["pre_quant_val_bpb"] == 1.21730000 and sub["bytes_total"] == 15_864_777 and sub["bytes_code"] == CODE
    assert sub["bytes_model_int8_zlib"] == 15_864_777 - CODE
    assert sub["step_stop"] == 13780 and sub["wallclock_seconds"] == 600.038 and sub["eval_time_seconds"] == 1.401
    assert sub["hardware"] == "8xNVIDIA H100 80GB HBM3" and sub["pytorch_version"] == "2.13.0+cu128" and sub["hymba_layers"] == [4]
    assert sub["seed_results"]["42"] == {"val_loss": 2.07210012, "val_bpb": 1.22401234, "artifact_bytes": 15_862_001, "step_stop": 13801}
    readme = (FOLDER / "README.md").read_text()
    table = [line for line in readme.splitlines() if line.startswith("| ")]
    assert table == ["| seed | steps | train time (s) | pre-quant val_bpb | final val_bpb | artifact bytes |",
                     "| ---: | ---: | ---: | ---: | ---: | ---: |",
                     "| 1337 | 13,780 | 600.038 | 1.21720000 | 1.22436570 | 15,863,489 |",
                     "| 42 | 13,801 | 600.012 | 1.21680000 | 1.22401234 | 15,862,001 |",
                     "| 2025 | 13,765 | 600.051 | 1.21790000 | 1.22512345 | 15,864,777 |",
                     "| mean | 13,782.0 | 600.034 | 1.21730000 | 1.22450050 | 15,863,422.3 |",
                     "| std | 18.1 | 0.020 | 0.00055678 | 0.00056769 | 1,389.2 |"]
    assert readme.startswith("# HymbaHybridHeads\n\nHybrid heads in layer 4.\n")
    assert "**val_bpb 1.22450050** (std 0.00056769) over seeds 1337, 42, 2025" in readme
    assert "the `final_int8_zlib_roundtrip_exact` line" in readme and "`train.log` is `train_seed1337.log`" in readme
    assert (f"python tools/make_record.py logs/s1337.txt logs/s42.txt logs/s2025.txt --script train_gpt.py --track 10min_16mb "
            "--name HymbaHybridHeads --author 'Test Author' --github-id tester --blurb 'Hybrid heads in layer 4.' --date 2026-05-04") in readme
    assert sorted(p.name for p in FOLDER.parent.iterdir()) == [FOLDER.name]  # no temp folder left beside it


def test_pr1493_family_scores_with_its_last_line_and_ships_a_self_extracting_script_alone(work):
    payload = base64.b85encode(lzma.compress(b"import hymba_layer  # runs inside\n", format=lzma.FORMAT_RAW,
                                             filters=[{"id": lzma.FILTER_LZMA2}])).decode()
    wrapper = ('import lzma as L,base64 as B\n'
               f'exec(L.decompress(B.b85decode("{payload}"),format=L.FORMAT_RAW,filters=[{{"id":L.FILTER_LZMA2}}]))\n')
    (work / "wrapped.py").write_text(wrapper)
    logs = write_logs(work, {seed: pr1493_log(seed, len(wrapper)) for seed in P1493_RUNS})
    assert make(*logs, "--script", "wrapped.py", "--track", "10min_16mb", "--name", "TTT") == 0
    folder = pathlib.Path("records/track_10min_16mb/2026-05-04_TTT")
    assert (folder / "train_gpt.py").read_text() == wrapper and not (folder / "hymba_layer.py").exists()
    sub = json.loads((folder / "submission.json").read_text())
    assert sub["seeds"] == [42, 314, 999]
    assert sub["val_bpb"] == round((1.08079352 + 1.08103456 + 1.08118765) / 3, 8)  # quantized_ttt, the last score line
    assert sub["pre_quant_val_bpb"] == round((1.08734790 + 1.08741002 + 1.08750123) / 3, 8)  # pre-quantization post-ema
    assert sub["bytes_total"] == 15_993_232 and sub["bytes_model_quantized_brotli"] == 15_993_232 - len(wrapper)
    assert sub["step_stop"] == 4550 and sub["wallclock_seconds"] == 588.047 and sub["eval_time_seconds"] == 366.512
    assert sub["hardware"] == "8xNVIDIA H100 80GB HBM3" and sub["dataset"] == "fineweb10B_sp8192 (128 train shards, 40540160 val tokens)"
    readme = (folder / "README.md").read_text()
    assert "| 314 | 4,557 | 588.102 | 1.08741002 | 1.08103456 | 15,992,919 |" in readme
    assert "the `quantized_ttt` line" in readme and "the `pre-quantization post-ema` score" in readme


def test_inlined_script_ships_alone_and_its_code_size_is_the_script(work):
    inlined = "import torch\n" + patch_host.inline_block('"""Use as:\n\n    import hymba_layer\n"""\n')
    (work / "train_gpt.py").write_text(inlined)
    code = len(inlined.encode())
    logs = write_logs(work, {seed: int8_log(seed, code, inlined) for seed in RUNS})
    assert make(*logs, *RECORD) == 0
    assert sorted(p.name for p in FOLDER.iterdir() if p.suffix == ".py") == ["train_gpt.py"]
    assert json.loads((FOLDER / "submission.json").read_text())["bytes_code"] == code


def test_script_that_never_imports_the_module_ships_alone(work):
    (work / "train_gpt.py").write_text("import torch  # hymba_layer is not used\n")
    assert make_record.shipped_code(work / "train_gpt.py", True) == {"train_gpt.py": work / "train_gpt.py"}


def test_this_projects_train_gpt_imports_the_module_only_for_hybrid_runs():
    assert list(make_record.shipped_code(REPO / "train_gpt.py", True)) == ["train_gpt.py", "hymba_layer.py"]
    assert list(make_record.shipped_code(REPO / "train_gpt.py", False)) == ["train_gpt.py"]


def test_baseline_log_of_this_projects_train_gpt_ships_it_alone(work):
    script = (REPO / "train_gpt.py").read_text(encoding="utf-8")
    (work / "train_gpt.py").write_text(script, encoding="utf-8")
    (work / "hymba_layer.py").write_text((REPO / "hymba_layer.py").read_text(encoding="utf-8"), encoding="utf-8")
    code = len(script.encode("utf-8"))  # no HYMBA_* set: train_gpt.py counts itself only
    logs = write_logs(work, {seed: int8_log(seed, code, script, hybrid=False) for seed in RUNS})
    assert make(*logs, *RECORD) == 0
    assert sorted(p.name for p in FOLDER.iterdir() if p.suffix == ".py") == ["train_gpt.py"]
    assert (FOLDER / "train_gpt.py").read_text(encoding="utf-8") == script
    sub = json.loads((FOLDER / "submission.json").read_text())
    assert sub["bytes_code"] == code and sub["hymba_layers"] == []
    assert "- `train_gpt.py`: the code" in (FOLDER / "README.md").read_text()


def test_root_logs_take_their_seeds_from_the_seeds_option(work):
    logs = write_logs(work, {seed: int8_log(seed, CODE, SCRIPT, family="root", seed_line=False) for seed in RUNS})
    assert make(*logs, *RECORD, "--seeds", "1337,42,2025") == 0
    sub = json.loads((FOLDER / "submission.json").read_text())
    assert sub["seeds"] == [1337, 42, 2025] and sub["seed_results"]["2025"]["val_bpb"] == 1.22512345
    assert sub["hardware"] == "8xNVIDIA H100 80GB HBM3" and sub["hymba_layers"] == [4]
    assert sorted(p.name for p in FOLDER.glob("train_seed*.log")) == ["train_seed1337.log", "train_seed2025.log", "train_seed42.log"]


def test_root_log_without_a_seed_and_without_the_seeds_option_is_refused(work, capsys):
    logs = write_logs(work, {seed: int8_log(seed, CODE, SCRIPT, family="root", seed_line=False) for seed in RUNS})
    assert make(*logs, *RECORD) == 2
    refused(capsys, "logs/s1337.txt: the log names no seed (root log); give one seed per log, in log order, with --seeds")


def test_seeds_option_that_contradicts_a_logged_seed_is_refused(work, capsys):
    logs = write_logs(work, {seed: int8_log(seed, CODE, SCRIPT) for seed in RUNS})
    assert make(*logs, *RECORD, "--seeds", "1337,2025,42") == 2
    refused(capsys, "logs/s42.txt: the log says seed 42 but --seeds gives 2025")


def test_log_without_its_final_score_is_refused(work, capsys):
    texts = {seed: int8_log(seed, CODE, SCRIPT) for seed in RUNS}
    texts[42] = texts[42].split("final_int8_zlib_roundtrip ")[0]
    assert make(*write_logs(work, texts), *RECORD) == 2
    refused(capsys, "logs/s42.txt: the log has no 'final_int8_*_roundtrip_exact' line")


def test_log_without_its_bytes_lines_is_refused(work, capsys):
    texts = {seed: int8_log(seed, CODE, SCRIPT) for seed in RUNS}
    texts[2025] = "\n".join(l for l in texts[2025].splitlines() if not l.startswith("Total submission size int8"))
    assert make(*write_logs(work, texts), *RECORD) == 2
    refused(capsys, "logs/s2025.txt: the log has no 'Total submission size int8+*' line")


def test_pr1493_log_that_stops_before_its_promised_ttt_score_is_refused(work, capsys):
    texts = {seed: pr1493_log(seed, CODE) for seed in P1493_RUNS}
    texts[314] = texts[314].split("ttt:start")[0]  # its Hyperparameters say ttt_enabled: True
    assert make(*write_logs(work, texts), *RECORD) == 2
    refused(capsys, "logs/s314.txt: the log has no 'quantized_ttt val_loss:... val_bpb:... eval_time:...ms' line")


def test_artifact_over_the_limit_is_refused(work, capsys):
    texts = {seed: int8_log(seed, CODE, SCRIPT) for seed in RUNS}
    texts[42] = texts[42].replace("Total submission size int8+zlib: 15862001 bytes", "Total submission size int8+zlib: 16000001 bytes")
    assert make(*write_logs(work, texts), *RECORD) == 2
    refused(capsys, "logs/s42.txt: artifact is 16000001 bytes, over the 16000000-byte limit")


def test_code_size_that_leaves_out_the_imported_module_is_refused(work, capsys):
    alone = len(SCRIPT.encode())
    logs = write_logs(work, {seed: int8_log(seed, alone, SCRIPT) for seed in RUNS})
    assert make(*logs, *RECORD) == 2
    refused(capsys, f"logs/s1337.txt: logs 'Code size: {alone} bytes' but the code that would ship is {CODE} bytes "
                    f"(train_gpt.py {alone} + hymba_layer.py {len(MODULE)})")


def test_record_track_with_two_seeds_is_refused(work, capsys):
    logs = write_logs(work, {seed: int8_log(seed, CODE, SCRIPT) for seed in (1337, 42)})
    assert make(*logs, *RECORD) == 2
    refused(capsys, "logs/s1337.txt, logs/s42.txt: the 10min_16mb track needs at least 3 seeds, these logs give 2 ([1337, 42])")


def test_non_record_track_takes_one_seed(work):
    logs = write_logs(work, {1337: int8_log(1337, CODE, SCRIPT)})
    assert make(*logs, *RECORD[:2], "--track", "non-record-16mb", "--name", "OneSeed") == 0
    readme = pathlib.Path("records/track_non_record_16mb/2026-05-04_OneSeed/README.md").read_text()
    assert "| mean | 13,780.0 | 600.038 | 1.21720000 | 1.22436570 | 15,863,489.0 |" in readme and "| std |" not in readme


def test_repeated_seed_is_refused(work, capsys):
    logs = write_logs(work, {seed: int8_log(seed, CODE, SCRIPT) for seed in RUNS})
    assert make(*logs, logs[1], *RECORD) == 2
    refused(capsys, "logs repeat a seed: logs/s42.txt and logs/s42.txt are both seed 42")


def test_existing_folder_is_refused_unless_forced(work, capsys):
    logs = write_logs(work, {seed: int8_log(seed, CODE, SCRIPT) for seed in RUNS})
    FOLDER.mkdir(parents=True)
    (FOLDER / "notes.txt").write_text("mine")
    assert make(*logs, *RECORD) == 2
    assert f"{FOLDER}: already exists" in capsys.readouterr().err
    assert [p.name for p in FOLDER.iterdir()] == ["notes.txt"] and [p.name for p in FOLDER.parent.iterdir()] == [FOLDER.name]
    assert make(*logs, *RECORD, "--force") == 0
    assert not (FOLDER / "notes.txt").exists() and (FOLDER / "submission.json").exists()
    assert [p.name for p in FOLDER.parent.iterdir()] == [FOLDER.name]


def test_a_failure_while_writing_leaves_no_partial_folder(work, monkeypatch):
    logs = write_logs(work, {seed: int8_log(seed, CODE, SCRIPT) for seed in RUNS})
    real_write = pathlib.Path.write_bytes

    def write_then_fail(path, data):
        if path.name == "README.md":
            raise OSError("disk full")
        return real_write(path, data)

    monkeypatch.setattr(pathlib.Path, "write_bytes", write_then_fail)
    with pytest.raises(OSError, match="disk full"):
        make(*logs, *RECORD)
    assert list(FOLDER.parent.iterdir()) == []
    FOLDER.mkdir()
    (FOLDER / "notes.txt").write_text("mine")
    with pytest.raises(OSError, match="disk full"):
        make(*logs, *RECORD, "--force")
    assert [p.name for p in FOLDER.iterdir()] == ["notes.txt"] and [p.name for p in FOLDER.parent.iterdir()] == [FOLDER.name]


def test_help_shows_the_example():
    with pytest.raises(SystemExit) as exit_:
        make_record.main(["--help"])
    assert exit_.value.code == 0


# ----------------------------------------------------------------------------- logs of the patched late-April record

# submission.json as the records write it (golf_conventions 6.2): the core set, the recommended fields, and the
# multi-seed (R1493) style's seeds, per-seed results, hardware and compliance flags
SCHEMA = {"author": str, "github_id": str, "name": str, "blurb": str, "date": str, "track": str, "val_loss": float, "val_bpb": float,
          "val_bpb_std": float, "pre_quant_val_loss": float, "pre_quant_val_bpb": float, "bytes_total": int, "bytes_code": int,
          "step_stop": int, "wallclock_seconds": float, "eval_time_seconds": float, "hardware": str, "pytorch_version": str,
          "seeds": list, "seed_results": dict, "compliance": dict}
COMPLIANCE = {"train_under_600s", "artifact_under_16mb", "eval_under_600s", "three_seeds"}
RECORD_SEEDS = (1337, 42, 2025)


@pytest.fixture(scope="module")
def record_logs(tmp_path_factory, data_dir):  # noqa: F811
    """Three seeds of the patched record's CPU copy (tests/hosts.py), block 1 hybrid, 4 steps each (~20 s a run):
    the log files it writes (logs/<RUN_ID>.txt), with GPTQ export and phased TTT scores."""
    data = data_dir
    folder = tmp_path_factory.mktemp("record_runs")
    script = write_script(folder / "train_gpt.py", "record", patched=True)
    logs = []
    for seed in RECORD_SEEDS:
        run_id = f"mr_{seed}_{uuid.uuid4().hex[:8]}"  # TTT keeps its counters in /tmp/ttt_*_{RUN_ID}
        try:
            proc = subprocess.run([sys.executable, str(script)], cwd=folder, capture_output=True, text=True, timeout=300,
                                  env=host_env(**{**TINY, "ITERATIONS": 4, "SEED": seed}, RUN_ID=run_id, DATA_DIR=f"{data}/", HYMBA_LAYERS="1"))
        finally:
            for name in ("counter", "prefix_counter", "pause_flag"):
                pathlib.Path(f"/tmp/ttt_{name}_{run_id}").unlink(missing_ok=True)
        assert proc.returncode == 0, proc.stderr[-3000:]
        logs.append(folder / "logs" / f"{run_id}.txt")
    return script, logs


def logged(pattern: str, log: pathlib.Path) -> str:
    """The first match of `pattern` on a line after the log's source block (what the test reads on its own)."""
    text = log.read_text(encoding="utf-8").split("Running PyTorch", 1)[1]
    return re.search(pattern, text, re.M).group(1)


@pytest.fixture
def record_work(record_logs, tmp_path, monkeypatch):
    """The record runs' script and logs copied into a fresh folder (a test may edit its copies)."""
    monkeypatch.chdir(tmp_path)
    script, logs = record_logs
    shutil.copy(script, tmp_path / "train_gpt.py")
    (tmp_path / "logs").mkdir()
    for seed, log in zip(RECORD_SEEDS, logs):
        shutil.copy(log, tmp_path / "logs" / f"s{seed}.txt")
    return [f"logs/s{seed}.txt" for seed in RECORD_SEEDS]


RECORD_ARGS = ["--script", "train_gpt.py", "--track", "10min_16mb", "--name", "HymbaRecord", "--gpu", "cpu"]
RECORD_FOLDER = pathlib.Path("records/track_10min_16mb/2026-05-04_HymbaRecord")


def test_record_logs_make_a_folder_in_the_records_schema(record_work):
    assert make(*record_work, *RECORD_ARGS) == 0
    assert sorted(p.name for p in RECORD_FOLDER.iterdir()) == ["README.md", "submission.json", "train.log", "train_gpt.py",
                                                               "train_seed1337.log", "train_seed2025.log", "train_seed42.log"]
    script = pathlib.Path("train_gpt.py").read_text(encoding="utf-8")
    assert (RECORD_FOLDER / "train_gpt.py").read_text(encoding="utf-8") == script and patch_host.BEGIN in script  # module inlined
    sub = json.loads((RECORD_FOLDER / "submission.json").read_text())
    assert {k: type(v) for k, v in sub.items() if k in SCHEMA} == SCHEMA, set(SCHEMA) - set(sub)
    assert set(sub["compliance"]) == COMPLIANCE and all(sub["compliance"].values())  # seconds of CPU, a 1.3 MB artifact
    assert sub["seeds"] == list(RECORD_SEEDS) and set(sub["seed_results"]) == {str(s) for s in RECORD_SEEDS}
    assert all(set(r) == {"val_loss", "val_bpb", "artifact_bytes", "step_stop"} for r in sub["seed_results"].values())
    logs = [pathlib.Path(p) for p in record_work]
    ttt = [float(logged(r"^quantized_ttt_phased val_loss:\S+ val_bpb:(\S+) eval_time", log)) for log in logs]
    pre = [float(logged(r"^diagnostic pre-quantization post-ema val_loss:\S+ val_bpb:(\S+) ", log)) for log in logs]
    assert sub["val_bpb"] == round(sum(ttt) / 3, 8) and sub["pre_quant_val_bpb"] == round(sum(pre) / 3, 8)  # the phased TTT score
    assert [sub["seed_results"][str(s)]["val_bpb"] for s in RECORD_SEEDS] == ttt
    compressed = int(logged(r"^Code size \(compressed\): (\d+) bytes", logs[0]))
    assert sub["bytes_code"] == compressed < len(script.encode()) == int(logged(r"^Code size \(uncompressed\): (\d+) bytes", logs[0]))
    assert sub["bytes_total"] == max(int(logged(r"^Total submission size quantized\+lzma: (\d+) bytes", log)) for log in logs)
    assert sub["bytes_model_quantized_lzma"] == sub["bytes_total"] - compressed and sub["step_stop"] == 4
    assert sub["hardware"] == "cpu" and sub["pytorch_version"] == torch.__version__
    readme = (RECORD_FOLDER / "README.md").read_text()
    assert "the `quantized_ttt_phased` line" in readme and "the `diagnostic pre-quantization post-ema` score" in readme
    assert "| seed | `diagnostic pre-quantization post-ema` | `diagnostic quantized` | `quantized_ttt_phased` |" in readme
    assert f"| 42 | {pre[1]:.8f} | " in readme and f" | {ttt[1]:.8f} |\n" in readme
    assert "recomputed as the record computes it (pyminify, then lzma and base85)" in readme or "was not recomputed" in readme
    # the module's layer lines reach the record's own log file (its log()), so the settings are the logged ones
    assert sub["hymba_layers"] == [1] and "\nhymba:layer 1 attn_heads:" in readme


def test_record_logs_are_read_with_the_source_block_skipped(record_logs, tmp_path):
    """The record logs its whole source between two separators: nothing in it is read as a log line, not even a
    line of a docstring that looks like one (here a score and a hymba:layer line put at the top of the source)."""
    log = tmp_path / "s1337.txt"
    lookalikes = "diagnostic quantized val_loss:1.0 val_bpb:0.5 eval_time:1ms\nhymba:layer 7 attn_heads:1 ssm_heads:1 kv_heads:1\n"
    log.write_text(record_logs[1][0].read_text(encoding="utf-8").replace("Source code:\n" + "=" * 100 + "\n",
                                                                         "Source code:\n" + "=" * 100 + "\n" + lookalikes, 1))
    run = make_record.read_runs([str(log)], gpu="cpu")[0]
    assert run["family"] == "record" and run["score_label"] == "quantized_ttt_phased" and run["seed"] == 1337
    assert run["hymba_layers"] == [1] and not any("hymba:layer 7" in line for line in run["hymba"])  # the run's own line only
    assert [label for label, *_ in run["scores"]] == ["diagnostic pre-quantization post-ema", "diagnostic quantized", "quantized_ttt_phased"]
    assert run["code_bytes_uncompressed"] == len(record_logs[0].read_bytes())


def test_unfinished_record_log_is_refused(record_work, capsys):
    log = pathlib.Path(record_work[1])
    log.write_text(log.read_text(encoding="utf-8").split("quantized_ttt_phased val_loss")[0], encoding="utf-8")
    assert make(*record_work, *RECORD_ARGS) == 2
    refused(capsys, "logs/s42.txt: the log has no 'quantized_ttt_phased val_loss:... val_bpb:... eval_time:...ms' line")


def test_repeated_record_seed_is_refused(record_work, capsys):
    assert make(*record_work, record_work[0], *RECORD_ARGS) == 2
    refused(capsys, "logs repeat a seed: logs/s1337.txt and logs/s1337.txt are both seed 1337")


def test_record_script_that_is_not_the_one_that_ran_is_refused(record_work, capsys):
    script = pathlib.Path("train_gpt.py")
    script.write_text(script.read_text(encoding="utf-8") + "# edited after the runs\n", encoding="utf-8")
    assert make(*record_work, *RECORD_ARGS) == 2
    refused(capsys, "logs/s1337.txt: logs 'Code size (uncompressed): ")


@pytest.mark.skipif(not shutil.which("pyminify"), reason="pyminify (python-minifier) not installed: the compressed size is not recomputed")
def test_record_compressed_code_size_that_is_not_the_scripts_is_refused(record_work, capsys):
    log = pathlib.Path(record_work[2])
    text = log.read_text(encoding="utf-8")
    logged_size = int(re.search(r"^Code size \(compressed\): (\d+) bytes$", text, re.M).group(1))
    log.write_text(text.replace(f"Code size (compressed): {logged_size} bytes", f"Code size (compressed): {logged_size - 1} bytes"),
                   encoding="utf-8")
    assert make(*record_work, *RECORD_ARGS) == 2
    refused(capsys, f"logs/s2025.txt: logs 'Code size (compressed): {logged_size - 1} bytes' but train_gpt.py wrapped as the record "
                    f"wraps it (pyminify, lzma, base85) is {logged_size} bytes here")


def test_record_log_without_a_gpu_is_refused(record_work, capsys):
    assert make(*record_work, *RECORD_ARGS[:-2]) == 2
    refused(capsys, "logs/s1337.txt: the log names no GPU (record log); say which with --gpu")
