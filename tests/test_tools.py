"""The tools outside the counted files: the submission writer and the quality benchmark, on real
(tiny) train_gpt.py runs, and the speed benchmark's quick setting."""
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, grab, run_train_gpt, tiny_config

sys.path.insert(0, str(REPO / "tools"))
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
    assert bench_quality.main(["--preset", "smoke", "--configs", "baseline,hymba", "--seeds", "1", "--out", str(out),
                               "--data", str(dataset["data_path"]), "--tokenizer", str(dataset["tokenizer_path"]),
                               "--set", f"VOCAB_SIZE={dataset['vocab_size']}"]) == 0
    table = (out / "results.md").read_text()
    rows = [l for l in table.splitlines() if l.startswith("| baseline") or l.startswith("| hymba")]
    results = json.loads((out / "results.json").read_text())
    bpb = {r["config"]: r["val_bpb"] for r in results["runs"]}
    assert len(rows) == 2 and "(1.00x)" in rows[0] and rows[1].startswith("| hymba | baseline |")
    assert ("(1/1) |" in rows[1]) == (bpb["hymba"] < bpb["baseline"])  # the paired Δ counts the seed
    assert (out / "quality.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [r["config"] for r in results["rows"]] == ["baseline", "hymba"]
    steps = [[c[0] for c in run["curve"]] for run in results["runs"]]
    assert steps == [[0, 3, 6], [0, 3, 6]]  # PRESETS["smoke"]: 6 iterations, validated every 3


def test_quality_benchmark_pairs_each_config_with_its_reference():
    names = ["baseline", "hymba", "state8", "layer0", "layer0_mean", "kv1_baseline", "kv1_ssm2", "l9_layer4"]
    assert [bench_quality.reference(n, names) for n in names] == ["baseline", "baseline", "hymba", "baseline", "layer0", "baseline",
                                                                   "kv1_baseline", "baseline"]
    assert bench_quality.reference("hymba", ["hymba", "layer0"]) == "hymba"


def test_quality_benchmark_rejects_unknown_config(capsys):
    with pytest.raises(SystemExit):
        bench_quality.main(["--configs", "baseline,nope"])
    assert "unknown ['nope']" in capsys.readouterr().err


def test_speed_benchmark_quick_writes_every_table(tmp_path):
    """Timings are not asserted (a shared CPU is noisy): every table is there, activation bytes were
    counted and the scan's error against the fp64 loop is tiny."""
    out = tmp_path / "speed.md"
    subprocess.run([sys.executable, str(REPO / "tools" / "bench_speed.py"), "--quick", "--out", str(out)],
                   check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    layer, scan, chunk = out.read_text().split("\n## ")[1:]
    rows = lambda section: [[c.strip() for c in l.split("|")[1:-1]] for l in section.splitlines() if l.startswith("| ") and "---" not in l][1:]
    assert [r[0] for r in rows(layer)] == ["attention", "hybrid"] and all(float(r[3]) > 0 for r in rows(layer))
    assert "hybrid / attention time: **" in layer
    assert [r[0] for r in rows(scan)] == ["64", "256"] and all(float(r[5]) < 1e-5 for r in rows(scan))
    assert [r[0] for r in rows(chunk)] == ["16", "64"] and min(float(r[2][:-1]) for r in rows(chunk)) == 1.0
