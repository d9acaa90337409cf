"""The tools outside the counted files: the submission writer and the quality benchmark, on real
(tiny) train_gpt.py runs, and the speed benchmark's quick setting."""
import json
import os
import re
import subprocess
import sys

import pytest

from conftest import REPO, clean_env, grab, run_train_gpt, tiny_config

sys.path.insert(0, str(REPO / "tools"))
import bench_gpu  # noqa: E402
import bench_quality  # noqa: E402
import write_submission  # noqa: E402

META = ["--author", "Test Author", "--github-id", "tester", "--name", "Tiny hybrid", "--blurb", "CPU test run"]


@pytest.fixture(scope="module")
def logs(dataset, tmp_path_factory):
    """Two seeds of a 6-step hybrid run, validated at step 3 and at the end."""
    out = {}
    for seed in (1, 2):
        cwd = tmp_path_factory.mktemp(f"seed{seed}")
        run_train_gpt(cwd, tiny_config(dataset, "run", SEED=seed, ITERATIONS=6, VAL_LOSS_EVERY=3, HYMBA_LAYERS="1"))
        out[seed] = cwd / "logs" / "run.txt"
    return out


def test_submission_json_carries_the_logged_numbers(logs, tmp_path):
    out = tmp_path / "submission.json"
    assert write_submission.main([str(logs[1]), str(logs[2]), "--out", str(out), *META]) == 0
    sub = json.loads(out.read_text())
    texts = {s: p.read_text() for s, p in logs.items()}
    exact = {s: grab(r"^final_int8_zlib_roundtrip_exact val_loss:{n} val_bpb:{n}", t)[0] for s, t in texts.items()}
    pre = {s: grab(r"^step:6/6 val_loss:{n} val_bpb:{n}", t)[0] for s, t in texts.items()}
    totals = {s: int(grab(r"^Total submission size int8\+zlib: {n} bytes", t)[0][0]) for s, t in texts.items()}
    assert sub["seeds"] == [1, 2]
    assert sub["val_bpb"] == pytest.approx((exact[1][1] + exact[2][1]) / 2, abs=1e-8)
    assert sub["val_loss"] == pytest.approx((exact[1][0] + exact[2][0]) / 2, abs=1e-8)
    assert sub["seed_results"]["2"]["val_bpb"] == exact[2][1]
    assert sub["pre_quant_val_bpb"] == pytest.approx((pre[1][1] + pre[2][1]) / 2, abs=1e-8)
    assert sub["val_bpb_std"] == pytest.approx(abs(exact[1][1] - exact[2][1]) / 2 ** 0.5, abs=1e-8)
    assert sub["bytes_total"] == max(totals.values())
    code = int(grab(r"^Code size: {n} bytes", texts[1])[0][0])
    assert sub["bytes_code"] == code == len((REPO / "train_gpt.py").read_bytes()) + len((REPO / "hymba_layer.py").read_bytes())
    assert sub["step_stop"] == 6 and sub["hardware"] == "cpu" and sub["hymba_layers"] == [1]
    assert sub["track"] == "non-record-16mb" and sub["author"] == "Test Author"
    assert sub["dataset"].startswith("golf (2 train shards")


def test_truncated_log_is_refused_and_nothing_written(logs, tmp_path, capsys):
    lines = logs[1].read_text().splitlines()
    cut = next(i for i, l in enumerate(lines) if l.startswith("final_int8_zlib_roundtrip "))
    truncated = tmp_path / "truncated.txt"
    truncated.write_text("\n".join(lines[:cut]) + "\n")
    out = tmp_path / "submission.json"
    assert write_submission.main([str(truncated), "--out", str(out), *META]) == 2
    assert "no 'final_int8_*_roundtrip_exact' line" in capsys.readouterr().err
    assert not out.exists() and list(tmp_path.iterdir()) == [truncated]


def test_over_budget_log_is_refused(logs, tmp_path, capsys):
    text = logs[1].read_text()
    total = int(grab(r"^Total submission size int8\+zlib: {n} bytes", text)[0][0])
    big = tmp_path / "big.txt"
    big.write_text(text.replace(f"Total submission size int8+zlib: {total} bytes", "Total submission size int8+zlib: 16000001 bytes"))
    assert write_submission.main([str(big), "--out", str(tmp_path / "s.json"), *META]) == 2
    assert "16000001 bytes, over the 16000000-byte limit" in capsys.readouterr().err


def test_repeated_seed_is_refused(logs, tmp_path, capsys):
    assert write_submission.main([str(logs[1]), str(logs[1]), "--out", str(tmp_path / "s.json"), *META]) == 2
    assert "repeat a seed" in capsys.readouterr().err


def test_quality_benchmark_smallest_setting_writes_table_and_plot(dataset, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "bench"
    assert bench_quality.main(["--preset", "smoke", "--configs", "baseline,layer0", "--seeds", "1", "--out", str(out),
                               "--data", str(dataset["data_path"]), "--tokenizer", str(dataset["tokenizer_path"]),
                               "--set", f"VOCAB_SIZE={dataset['vocab_size']}"]) == 0
    table = (out / "results.md").read_text()
    rows = [l for l in table.splitlines() if l.startswith("| baseline") or l.startswith("| layer0")]
    results = json.loads((out / "results.json").read_text())
    bpb = {r["config"]: r["val_bpb"] for r in results["runs"]}
    assert len(rows) == 2 and "(1.00x)" in rows[0] and rows[1].startswith("| layer0 | baseline |")
    assert ("(1/1) |" in rows[1]) == (bpb["layer0"] < bpb["baseline"])  # the paired Δ counts the seed
    assert (out / "quality.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [r["config"] for r in results["rows"]] == ["baseline", "layer0"]
    steps = [[c[0] for c in run["curve"]] for run in results["runs"]]
    assert steps == [[0, 3, 6], [0, 3, 6]]  # PRESETS["smoke"]: 6 iterations, validated every 3


def test_quality_benchmark_pairs_each_config_with_its_reference():
    names = ["baseline", "layer0", "layer0_conv4", "layer1", "l9_baseline", "l9_layer4"]
    assert [bench_quality.reference(n, names) for n in names] == ["baseline", "baseline", "layer0", "baseline", "l9_baseline", "l9_baseline"]
    assert bench_quality.reference("layer0_conv4", ["layer0_conv4", "layer1"]) == "layer0_conv4"


def test_quality_benchmark_rejects_unknown_config(capsys):
    with pytest.raises(SystemExit):
        bench_quality.main(["--configs", "baseline,nope"])
    assert "unknown ['nope']" in capsys.readouterr().err


def markdown_tables(text: str) -> dict[str, tuple[str, list[dict[str, str]]]]:
    """Each '## ' section of a markdown report: title -> (its text, its table as rows of {header: cell})."""
    out = {}
    for section in text.split("\n## ")[1:]:
        title = section.splitlines()[0]
        table = [[c.strip() for c in l.split("|")[1:-1]] for l in section.splitlines() if l.startswith("|") and "---" not in l]
        out[title] = (section, [dict(zip(table[0], row)) for row in table[1:]] if table else [])
    return out


def section(tables: dict, prefix: str) -> tuple[str, list[dict[str, str]]]:
    [title] = [t for t in tables if t.startswith(prefix)]
    return tables[title]


def within_rounding(shown: float, a: float, b: float, digits: int, time_digits: int = 2) -> bool:
    """shown, printed with `digits` decimals, is a / b, where a and b were printed with `time_digits`."""
    half = 0.5 * 10**-time_digits
    return abs(shown - a / b) <= 0.5 * 10**-digits + a / b * (half / a + half / b)


def test_speed_benchmark_quick_reports_consistent_numbers(monkeypatch, tmp_path):
    """Timings themselves are not asserted (a shared CPU is noisy), but every number derived from them is
    checked against the table: each time ratio, speedup and "vs fastest" is the ratio of the printed times;
    the parameter counts are those of the layers built here from the same config; the scan's error against
    the fp64 loop is a small positive number. Columns are found by header, so added columns do not matter."""
    out = tmp_path / "speed.md"
    subprocess.run([sys.executable, str(REPO / "tools" / "bench_speed.py"), "--quick", "--out", str(out)],
                   check=True, capture_output=True, env=clean_env())
    tables = markdown_tables(out.read_text())

    import hymba_layer
    import train_gpt
    for k in [k for k in os.environ if k.startswith("HYMBA_")]:
        monkeypatch.delenv(k)
    hymba_layer.register_host_classes(train_gpt.CastedLinear, train_gpt.Rotary, train_gpt.apply_rotary_emb)
    cfg = hymba_layer.HymbaConfig.from_env(4, 2, 16)  # --quick: width 64, 4 heads, 2 KV heads
    params = {"attention": train_gpt.CausalSelfAttention(64, 4, 2, 10000.0, 1.5),
              "hybrid": hymba_layer.HymbaLayer(64, 4, 2, 10000.0, 1.5, cfg=cfg)}
    text, rows = section(tables, "One layer")
    assert {r["layer"]: int(r["params"]) for r in rows} == {n: sum(p.numel() for p in m.parameters()) for n, m in params.items()}
    ms = {(r["layer"], col.removesuffix(" ms")): float(r[col]) for r in rows for col in r if col.endswith(" ms") and r[col] != "-"}
    shown = re.findall(r"\*\*([\d.]+)x\*\* (\w+)", text)  # "hybrid / attention time: **1.57x** eager, ..."
    assert ("attention", "eager") in ms and {mode for _, mode in shown} == {mode for _, mode in ms}
    assert all(within_rounding(float(r), ms["hybrid", mode], ms["attention", mode], 2) for r, mode in shown)

    text, rows = section(tables, "Whole training step")
    assert len(rows) == 2 and rows[0]["model"] == "baseline" and rows[1]["model"].startswith("HYMBA_LAYERS=")
    assert int(rows[1]["params"]) != int(rows[0]["params"])  # the hybrid run really swapped a layer
    ratio = dict((mode, float(r)) for r, mode in re.findall(r"\*\*([\d.]+)x\*\* (\w+)", text))["eager"]
    assert within_rounding(ratio, float(rows[1]["eager ms"]), float(rows[0]["eager ms"]), 2, time_digits=1)

    _, rows = section(tables, "Scan, forward")
    assert [r["T"] for r in rows] == ["64", "256"]
    assert all(r["shape"] == f"2 x {cfg.ssm_heads} x 16 x {cfg.ssm_state}" for r in rows)
    assert all(within_rounding(float(r["speedup"][:-1]), float(r["reference ms"]), float(r["ssd_scan ms"]), 1) for r in rows)
    assert all(0 < float(r["max rel err"]) < 1e-5 for r in rows)

    _, rows = section(tables, "Scan chunk size")
    assert [r["Q"] for r in rows] == ["16", "64"]
    fastest = min(float(r["median ms"]) for r in rows)
    assert all(within_rounding(float(r["vs fastest"][:-1]), float(r["median ms"]), fastest, 2) for r in rows)


def test_gpu_benchmark_refuses_without_cuda(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(bench_gpu.torch.cuda, "is_available", lambda: False)
    assert bench_gpu.main(["--out", str(tmp_path / "gpu.md")]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "bench_gpu.py: error: CUDA is not available: this benchmark times the GPU step (tools/bench_speed.py times the CPU)"]
    assert not list(tmp_path.iterdir())


def test_gpu_benchmark_whole_path_runs_on_cpu(tmp_path):
    """The hidden --device cpu --tiny: both GPTs built, compiled (dynamo, with the eager backend: no C++
    compiler), stepped and timed without a recompile, and the scan's bf16 error measured."""
    out = tmp_path / "gpu.md"
    subprocess.run([sys.executable, str(REPO / "tools" / "bench_gpu.py"), "--device", "cpu", "--tiny", "--backend", "eager",
                    "--samples", "2", "--out", str(out)], check=True, capture_output=True, env=clean_env())
    text = out.read_text()
    rows = [[c.strip() for c in l.split("|")[1:-1]] for l in text.split("\n## ")[0].splitlines() if l.startswith("| ") and "---" not in l]
    steps = [dict(zip(rows[0], r)) for r in rows[1:]]
    assert [r["model"] for r in steps] == ["baseline", "HYMBA_LAYERS=0"] and int(steps[1]["params"]) > int(steps[0]["params"])
    assert all(float(r["median step ms"]) > 0 and float(r["compile s"]) > 0 for r in steps)
    ratio = float(re.search(r"HYMBA_LAYERS=0 / baseline step time: \*\*([\d.]+)x\*\*", text).group(1))
    assert abs(ratio - float(steps[1]["median step ms"]) / float(steps[0]["median step ms"])) < 0.01
    _, scan = section(markdown_tables(text), "ssd_scan")
    assert [r["scan"] for r in scan] == ["eager", "compiled"] and all(1e-4 < float(r["max abs err / max abs reference"]) < 2e-2 for r in scan)
