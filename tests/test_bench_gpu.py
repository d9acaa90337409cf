"""tools/bench_gpu.py: a script's own training step, plain against hybrid, read from its log lines. Fake scripts
that print each family's lines check the reading, the ratios and that the run is stopped before its export
(no child left); --device cpu runs the CPU copy of the patched late-April record and this project's
train_gpt.py; without CUDA it refuses."""
import os
import re
import subprocess
import sys
import textwrap
import time

import pytest

import bench_gpu
from conftest import REPO, clean_env, tiny_config
from hosts import host_env, write_script
from test_host_record import TINY, data_dir  # noqa: F401 (the record's tiny shape; data_dir: its sp8192 data, a fixture)

# a fake training script: each family's train lines, 500 ms per step up to step SLOW (as if compiling), then 20 ms per step
# plain and 30 ms hybrid, then the peak line, then an "export" that never ends (the tool must stop it); it writes its pid
# to $PID_FILE, and logs a hymba:layer line if PATCHED
FAKE = textwrap.dedent('''
    import os, time
    n, hybrid = int(os.environ["ITERATIONS"]), "HYMBA_LAYERS" in os.environ
    open(os.environ["PID_FILE"], "a").write(f"{os.getpid()}\\n")
    if hybrid and PATCHED:
        print(f"hymba:layer {os.environ['HYMBA_LAYERS']} attn_heads:4 ssm_heads:4 kv_heads:4 head_dim:64 chunk:64 conv:4 window:0 params:198")
    print("  train_batch_tokens: 786432" if TOKS else "train_batch_tokens:786432 train_seq_len:2048 iterations:40")
    ms = 0.0
    for step in range(1, n + 1):
        ms += 500.0 if step <= SLOW else 30.0 if hybrid else 20.0
        if TOKS:
            print(f"{step}/{n} train_loss: 5.0000 train_time: {ms / 60000:.1f}m tok/s: {step * 786432 / (ms / 1000):.0f}")
        else:
            print(f"step:{step}/{n} train_loss:5.0000 train_time:{ms:.0f}ms step_avg:{ms / step:.2f}ms")
    print("peak memory allocated: 100 MiB reserved: 120 MiB", flush=True)
    time.sleep(STALL)
''')


def fake(tmp_path, *, patched=True, toks=False, stall=600, slow=0, name="train_gpt.py"):
    path = tmp_path / name
    path.write_text(f"PATCHED, TOKS, STALL, SLOW = {patched}, {toks}, {stall}, {slow}\n" + FAKE)
    return path


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def table(text: str) -> list[dict]:
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in text.splitlines() if line.startswith("| ") and "---" not in line]
    return [dict(zip(rows[0], r)) for r in rows[1:]]


def ratio(text: str) -> float:
    return float(re.search(r"/ plain: step time \*\*([\d.]+)x\*\*", text).group(1))


@pytest.mark.parametrize("toks", [False, True], ids=["step_avg lines", "tok/s lines"])
def test_reads_each_familys_step_lines_and_stops_the_run_before_its_export(tmp_path, monkeypatch, capsys, toks):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PID_FILE", str(tmp_path / "pids"))
    t0 = time.monotonic()
    assert bench_gpu.main([str(fake(tmp_path, toks=toks, slow=8)), "--device", "cpu", "--layers", "3", "--iterations", "12", "--skip", "8",
                           "--rounds", "2", "--out", str(tmp_path / "out.md")]) == 0
    assert time.monotonic() - t0 < 60  # four runs that would each sleep 600 s in their "export"
    pids = [int(p) for p in (tmp_path / "pids").read_text().split()]
    assert len(pids) == 4 and not any(alive(p) for p in pids)
    text = (tmp_path / "out.md").read_text()
    assert capsys.readouterr().out.startswith(text)
    rows = table(text)
    assert [(r["run"], r["round"]) for r in rows] == [("plain", "1"), ("HYMBA_LAYERS=3", "1"), ("plain", "2"), ("HYMBA_LAYERS=3", "2")]
    assert [float(r["step ms"]) for r in rows] == [20.0, 30.0] * 2  # steps 1-8 (500 ms each) left out by --skip
    rates = [float(r["tokens/s"].replace(",", "")) for r in rows]  # 786,432 tokens per step; tok/s is logged rounded
    assert all(abs(rate / expected - 1) < 1e-4 for rate, expected in zip(rates, [786432 / 0.020, 786432 / 0.030] * 2)), rates
    assert all(r["peak MiB"] == "-" for r in rows)  # --device cpu: no CUDA peak
    assert ratio(text) == 1.5 and "(medians over 2 rounds)" in text and "median over steps 9..12" in text


def test_unpatched_script_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PID_FILE", str(tmp_path / "pids"))
    script = fake(tmp_path, patched=False)
    assert bench_gpu.main([str(script), "--device", "cpu", "--iterations", "4", "--skip", "1"]) == 2
    err = capsys.readouterr().err
    assert err == (f"bench_gpu.py: error: {script}: the run with HYMBA_LAYERS=0 logged no 'hymba:layer' line: the script is not patched "
                   "(python tools/patch_host.py SCRIPT), or it swaps no layer\n")
    assert not any(alive(int(p)) for p in (tmp_path / "pids").read_text().split())


def test_run_that_ends_before_its_last_step_is_refused(tmp_path, monkeypatch, capsys):
    script = tmp_path / "short.py"
    script.write_text("print('step:1/40 train_loss:5.0 train_time:20ms step_avg:20.00ms')\nprint('Serialized model: 1 bytes')\n")
    assert bench_gpu.main([str(script), "--device", "cpu", "--iterations", "4", "--skip", "1"]) == 2
    assert capsys.readouterr().err.endswith("its training ended at step 1 of 4 (no 'step:N/M train_loss:...' or "
                                            "'N/M train_loss: ... tok/s:' line for the last steps)\n")


def test_run_that_stalls_is_stopped_at_the_timeout(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PID_FILE", str(tmp_path / "pids"))
    script = tmp_path / "stall.py"
    script.write_text("import os, time\nopen(os.environ['PID_FILE'], 'w').write(str(os.getpid()))\nprint('compiling', flush=True)\ntime.sleep(600)\n")
    t0 = time.monotonic()
    assert bench_gpu.main([str(script), "--device", "cpu", "--iterations", "4", "--skip", "1", "--timeout", "3"]) == 2
    assert time.monotonic() - t0 < 15  # 3 s, and up to 10 s for SIGTERM, which a sleeping Python obeys at once
    assert "no end of training within --timeout 3 s; last line: compiling" in capsys.readouterr().err
    assert not alive(int((tmp_path / "pids").read_text()))


@pytest.mark.parametrize("args, message", [
    (["--layers", "0;5"], "--layers '0;5' is not a list of block indices: give e.g. 0 or 0,5"),
    (["--iterations", "5", "--skip", "4"], "--iterations 5 --skip 4: need --skip >= 1 and --iterations >= --skip + 2"),
    (["--nproc", "0"], "--nproc 0 must be >= 1"),
])
def test_bad_options_are_refused_in_one_line(tmp_path, capsys, args, message):
    assert bench_gpu.main([str(fake(tmp_path)), "--device", "cpu", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"bench_gpu.py: error: {message}") and err.count("\n") == 1


def test_missing_script_is_refused(tmp_path, capsys):
    assert bench_gpu.main([str(tmp_path / "nope.py"), "--device", "cpu"]) == 2
    assert capsys.readouterr().err == f"bench_gpu.py: error: {tmp_path / 'nope.py'}: no such script; give the path of the training script to time\n"


def test_refuses_without_cuda(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    monkeypatch.setenv("PID_FILE", str(tmp_path / "pids"))
    assert bench_gpu.main([str(fake(tmp_path)), "--out", str(tmp_path / "gpu.md")]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "bench_gpu.py: error: CUDA is not available: this tool times the training step on the GPU; --device cpu runs a CPU-runnable "
        "script (e.g. a CPU copy of a host, tests/host_cpu.py)"]
    assert not (tmp_path / "pids").exists() and not (tmp_path / "gpu.md").exists()  # nothing ran, nothing written


def run_tool(cwd, env, *args) -> str:
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "bench_gpu.py"), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_cpu_copy_of_the_patched_record(tmp_path, data_dir):  # noqa: F811
    """The record's own step on the CPU, plain and with block 1 hybrid; stopped after training (no GPTQ export)."""
    script = write_script(tmp_path / "train_gpt.py", "record", patched=True)
    out = run_tool(tmp_path, host_env(**TINY, DATA_DIR=f"{data_dir}/"), str(script), "--device", "cpu", "--layers", "1",
                   "--iterations", "5", "--skip", "2")
    rows = table(out)
    assert [r["run"] for r in rows] == ["plain", "HYMBA_LAYERS=1"]
    for r in rows:  # tokens/s is TRAIN_BATCH_TOKENS / step time
        assert float(r["step ms"]) > 0 and abs(float(r["tokens/s"].replace(",", "")) - TINY["TRAIN_BATCH_TOKENS"] / float(r["step ms"]) * 1000) < 1
        log = (tmp_path / r["log"]).read_text().split("Running PyTorch", 1)[1]  # the lines after its source
        assert re.search(r"^5/5 train_loss: ", log, re.M) and "\nSerialized model" not in log
    assert abs(ratio(out) - float(rows[1]["step ms"]) / float(rows[0]["step ms"])) < 0.002
    assert not (tmp_path / "final_model.int6.ptz").exists()


def test_this_projects_train_gpt(tmp_path, dataset):
    """train_gpt.py on the CPU, plain and with block 0 hybrid; stopped at its export (its first line after training)."""
    env = clean_env(**{k: v for k, v in tiny_config(dataset, "unused", NUM_HEADS=4, NUM_KV_HEADS=2).items() if k != "RUN_ID"})
    out = run_tool(tmp_path, env, str(REPO / "train_gpt.py"), "--device", "cpu", "--iterations", "6", "--skip", "2")
    rows = table(out)
    assert [r["run"] for r in rows] == ["plain", "HYMBA_LAYERS=0"] and all(float(r["step ms"]) > 0 for r in rows)
    hybrid_log = (tmp_path / rows[1]["log"]).read_text()
    assert "hymba:layer 0 attn_heads:2 ssm_heads:2" in hybrid_log and "hymba:layer" not in (tmp_path / rows[0]["log"]).read_text()
    assert "final_int8_zlib_roundtrip" not in hybrid_log
