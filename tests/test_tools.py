"""The tools outside the counted files: the submission writer and the quality benchmark, on real
(tiny) train_gpt.py runs, and the speed benchmark's quick setting."""
import json
import re
import subprocess
import sys

import pytest

from conftest import REPO, clean_env, grab, run_train_gpt, tiny_config

import bench_quality
import write_submission

META = ["--author", "Test Author", "--github-id", "tester", "--name", "Tiny hybrid", "--blurb", "CPU test run"]


@pytest.fixture(scope="module")
def logs(dataset, tmp_path_factory):
    """Two seeds of a 6-step hybrid run, validated at step 3 and at the end."""
    out = {}
    for seed in (1, 2):
        cwd = tmp_path_factory.mktemp(f"seed{seed}")
        run_train_gpt(cwd, tiny_config(dataset, "run", SEED=seed, ITERATIONS=6, VAL_LOSS_EVERY=3, NUM_HEADS=4, NUM_KV_HEADS=2, HYMBA_LAYERS="1"))
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
    assert [bench_quality.reference(n, names) for n in names] == ["baseline", "baseline", "layer0", "baseline", "baseline", "l9_baseline"]
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


def ratio_ok(text: str, a: str, b: str, digits: int = 2, time_digits: int = 2) -> bool:
    """A printed ratio "1.23x" is a / b of the printed times a and b."""
    return within_rounding(float(text.removesuffix("x")), float(a), float(b), digits, time_digits)


def test_speed_benchmark_quick_reports_consistent_numbers(tmp_path):
    """Timings themselves are not asserted (a shared CPU is noisy), but every number derived from them is
    checked against the table: each hybrid / attention ratio, step ratio, speedup and "vs fastest" is the
    ratio of the printed times; the parameter counts are those of train_gpt's CausalSelfAttention and
    hymba_layer's HybridHeads built here; the compiled path (dynamo, fullgraph, the eager backend: no C++
    compiler) runs at one T without a recompile; the scan's error against the fp64 loop is small. Columns
    are found by header, so added columns do not matter."""
    out = tmp_path / "speed.md"
    subprocess.run([sys.executable, str(REPO / "bench" / "bench_speed.py"), "--quick", "--compile", "--compile-seqs", "128",
                    "--backend", "eager", "--out", str(out)], check=True, capture_output=True, env=clean_env())
    text = out.read_text()
    tables = markdown_tables(text)

    import hymba_layer
    import train_gpt
    # --quick: width 64, 4 heads / 2 KV heads, 2 SSM heads (one KV group), chunk 16, the module's conv taps, window 32
    attn = sum(p.numel() for p in train_gpt.CausalSelfAttention(64, 4, 2, 10000.0, 1.5).parameters())
    heads = sum(p.numel() for p in hymba_layer.HybridHeads(2, 1, 16, hymba_layer.HymbaConfig(2, (0,), 16, hymba_layer.HymbaConfig.conv, 32)).parameters())
    assert f"params: attention {attn:,}, hybrid {attn + heads:,}, attention W=32 {attn:,}, hybrid W=32 {attn + heads:,}" in text
    assert "T=8192 is not among --seqs: not measured" in section(tables, "Goal")[0]

    _, rows = section(tables, "One layer against context")
    assert [(r["T"], r["rows x T"], r["mode"]) for r in rows] == [("64", "4 x 64", "eager"), ("128", "2 x 128", "eager"), ("128", "2 x 128", "compiled")]
    for r in rows:
        assert all(float(r[f"{n} ms"]) > 0 for n in ("attention", "hybrid", "attention W=32", "hybrid W=32"))
        assert ratio_ok(r["hybrid / attention"], r["hybrid ms"], r["attention ms"])
        assert ratio_ok(r["hybrid W=32 / attention"], r["hybrid W=32 ms"], r["attention ms"])
        assert ratio_ok(r["hybrid W=32 / attention W=32"], r["hybrid W=32 ms"], r["attention W=32 ms"])
        assert ratio_ok(r["attention W=32 / attention"], r["attention W=32 ms"], r["attention ms"])
    _, rows = section(tables, "Memory")
    assert [(r["T"], r["mode"]) for r in rows] == [("64", "eager"), ("128", "eager")]  # CPU: saved tensors, eager only
    assert all(float(r[n]) > 0 for r in rows for n in ("attention", "hybrid", "attention W=32", "hybrid W=32"))
    _, rows = section(tables, "Compile time")
    assert [r["T"] for r in rows] == ["128"] and all(float(v) > 0 for r in rows for k, v in r.items() if k != "T")

    _, rows = section(tables, "Whole training step by T")
    assert [(r["T"], r["model"]) for r in rows] == [(T, m) for T in ("32", "64") for m in ("baseline", "hybrid layers all W=32")]
    for base, hyb in zip(rows[::2], rows[1::2]):
        assert base["step / baseline"] == "1.00x" and base["rows x T"] == hyb["rows x T"]
        assert ratio_ok(hyb["step / baseline"], hyb["step ms"], base["step ms"], time_digits=1)
        assert ratio_ok(hyb["fwd+bwd / baseline"], hyb["fwd+bwd ms"], base["fwd+bwd ms"], time_digits=1)
    params = dict(re.findall(r"(baseline|hybrid layers all W=32) ([\d,]+)", section(tables, "Whole training step")[0].split("params: ")[-1]))
    assert int(params["hybrid layers all W=32"].replace(",", "")) > int(params["baseline"].replace(",", ""))  # layers really swapped

    _, rows = section(tables, "Where the hybrid W=32 layer's time goes at T=128")
    assert {r["mode"] for r in rows} == {"eager", "compiled"} and all(0 < float(r["ms per call"]) for r in rows)

    _, rows = section(tables, "Scan, forward")
    assert [r["T"] for r in rows] == ["64", "128"] and all(r["shape"] == "1 x 2 x 16 x 16 (1 B groups)" for r in rows)
    assert all(ratio_ok(r["speedup"], r["reference ms"], r["ssd_scan ms"], digits=1) for r in rows)
    assert all(0 < float(r["max rel err"]) < 1e-5 for r in rows)

    _, rows = section(tables, "Scan chunk size")
    assert [r["Q"] for r in rows] == ["16", "64"]
    fastest = min((r["median ms"] for r in rows), key=float)
    assert all(ratio_ok(r["vs fastest"], r["median ms"], fastest) for r in rows)


def test_speed_benchmark_refuses_hymba_env_vars():
    """Its hybrid settings are options: a HYMBA_* env var would otherwise be silently ignored."""
    r = subprocess.run([sys.executable, str(REPO / "bench" / "bench_speed.py"), "--quick"], capture_output=True, text=True,
                       env={**clean_env(), "HYMBA_WINDOW": "64"})
    assert r.returncode == 2 and "HYMBA_WINDOW set: this script takes the hybrid's settings as options" in r.stderr


def test_bench_speed_layers_see_what_their_names_say():
    """bench_speed's contenders: "W=8" layers see exactly the last 8 tokens (an earlier token changes nothing
    at a position 8 or more later, and up to 7 later it does), the full ones every earlier token; the plain
    windowed layer is the plain layer wherever the window holds every earlier token; hybrid layers differ
    from plain ones (their last heads are SSM heads)."""
    import bench_speed
    torch = bench_speed.torch
    layers = bench_speed.attention_layers(32, 4, 2, 2, 4, 0, 8)
    assert list(layers) == ["attention", "hybrid", "attention W=8", "hybrid W=8"]
    x = torch.randn(2, 21, 32)
    x2 = x.clone()
    x2[:, 3] += 1.0  # a change at position 3
    with torch.no_grad():
        out = {n: (m(x), m(x2)) for n, m in layers.items()}
    changed = {n: ((a - b).abs().amax(dim=(0, 2)) > 1e-6).tolist() for n, (a, b) in out.items()}
    assert changed["attention"] == changed["hybrid"] == [False] * 3 + [True] * 18
    assert changed["attention W=8"] == [False] * 3 + [True] * 8 + [False] * 10  # positions 3..10 see position 3
    # the windowed hybrid's SSM heads see all; its attention heads only the window
    assert changed["hybrid W=8"] == [False] * 3 + [True] * 18
    a, aw = out["attention"][0], out["attention W=8"][0]
    torch.testing.assert_close(aw[:, :8], a[:, :8], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(aw[:, 8:], a[:, 8:]) and not torch.allclose(out["hybrid"][0], a)
