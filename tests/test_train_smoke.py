"""End to end on CPU: `python train_gpt.py` on small shards trains, logs, exports and re-scores
(golf_conventions 3.5, 3.8, 4.2-4.3)."""
import io

import pytest
import torch

import train_gpt
from conftest import REPO, grab, run_train_gpt, tiny_config

ITERATIONS = 40


@pytest.fixture(scope="module")
def run(dataset, tmp_path_factory):
    """One 40-step zlib run, validated at step 0 and at the end; shared by the tests below."""
    cwd = tmp_path_factory.mktemp("smoke")
    source = (REPO / "train_gpt.py").read_text(encoding="utf-8")  # the code the run reads
    stdout = run_train_gpt(cwd, tiny_config(dataset, "smoke", ITERATIONS=ITERATIONS, VAL_LOSS_EVERY=ITERATIONS))
    return dict(cwd=cwd, source=source, stdout=stdout, log=(cwd / "logs" / "smoke.txt").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def capped_run(dataset, tmp_path_factory):
    """A run far too long for its 3 s cap, exported with zstd."""
    cwd = tmp_path_factory.mktemp("capped")
    settings = tiny_config(dataset, "capped", ITERATIONS=100_000, WARMUP_STEPS=0, MAX_WALLCLOCK_SECONDS=3, COMPRESSOR="zstd")
    stdout = run_train_gpt(cwd, settings)
    return dict(cwd=cwd, stdout=stdout, log=(cwd / "logs" / "capped.txt").read_text(encoding="utf-8"))


def train_losses(text: str, iterations: int) -> dict[int, float]:
    return {int(s): loss for s, loss in grab(rf"^step:(\d+)/{iterations} train_loss:{{n}} ", text)}


def test_train_loss_falls_by_more_than_two_nats(run):
    losses = train_losses(run["log"], ITERATIONS)
    assert sorted(losses) == list(range(1, 11)) + [20, 30, 40]  # steps 1-10, then every TRAIN_LOG_EVERY
    assert losses[1] == pytest.approx(6.23, abs=0.02)             # ~ln(512) at init
    assert losses[40] < losses[1] - 2.0                            # measured: 6.23 -> 3.33


def test_final_val_bpb_is_well_below_step_zero(run):
    vals = {int(s): (loss, bpb) for s, loss, bpb in grab(rf"^step:(\d+)/{ITERATIONS} val_loss:{{n}} val_bpb:{{n}} ", run["log"])}
    assert sorted(vals) == [0, ITERATIONS]
    assert vals[0][1] > 4.4 and vals[ITERATIONS][1] < vals[0][1] - 1.5  # measured: 4.56 -> 2.46


def test_log_starts_with_the_source_and_holds_every_final_line(run):
    source, log = run["source"], run["log"]
    assert log.startswith(source + "\n" + "=" * 100 + "\n")
    for prefix in ["Serialized model: ", "Code size: ", "Total submission size: ", "Serialized model int8+zlib: ",
                   "Total submission size int8+zlib: ", "final_int8_zlib_roundtrip val_loss:", "final_int8_zlib_roundtrip_exact val_loss:"]:
        assert sum(line.startswith(prefix) for line in log.splitlines()) == 1, prefix
    assert log.splitlines()[-1].startswith("final_int8_zlib_roundtrip_exact val_loss:")
    assert source not in run["stdout"] and "final_int8_zlib_roundtrip_exact" in run["stdout"]


def test_artifact_plus_code_bytes_is_the_logged_total(run):
    code_bytes = len(run["source"].encode("utf-8"))
    ptz = run["cwd"] / "final_model.int8.ptz"
    [(logged_code,)] = grab(r"^Code size: (\d+) bytes$", run["log"])
    [(logged_model,)] = grab(r"^Serialized model int8\+zlib: (\d+) bytes", run["log"])
    [(logged_total,)] = grab(r"^Total submission size int8\+zlib: (\d+) bytes$", run["log"])
    [(raw_model,)] = grab(r"^Serialized model: (\d+) bytes$", run["log"])
    assert logged_code == code_bytes
    assert logged_model == ptz.stat().st_size
    assert logged_total == ptz.stat().st_size + code_bytes
    assert raw_model == (run["cwd"] / "final_model.pt").stat().st_size
    assert sorted(p.name for p in run["cwd"].iterdir()) == ["final_model.int8.ptz", "final_model.pt", "logs"]


def test_artifact_holds_int8_mlp_matrices_and_fp32_control_tensors(run):
    blob = (run["cwd"] / "final_model.int8.ptz").read_bytes()
    container = torch.load(io.BytesIO(train_gpt.decompress(blob, "zlib")), map_location="cpu")
    assert sorted(container["quantized"]) == [f"blocks.{i}.mlp.{m}.weight" for i in (0, 1) for m in ("fc", "proj")]
    controls = [f"blocks.{i}.{n}" for i in (0, 1) for n in ("attn_scale", "mlp_scale", "resid_mix", "attn.q_gain")] + ["skip_weights"]
    assert [container["passthrough"][n].dtype for n in controls] == [torch.float32] * 9
    assert container["passthrough"]["tok_emb.weight"].dtype == torch.float16  # 512 x 96 fits the passthrough limit


def test_roundtrip_val_loss_and_bpb_are_within_0_0005_of_the_last_pre_export_values(run):
    """5x the largest gap observed at the pre-export line's 4 decimals (0.0001): int8 per-row export barely
    moves a 40-step model."""
    [(pre_loss, pre_bpb)] = grab(rf"^step:{ITERATIONS}/{ITERATIONS} val_loss:{{n}} val_bpb:{{n}} ", run["log"])
    [(q_loss, q_bpb)] = grab(r"^final_int8_zlib_roundtrip val_loss:{n} val_bpb:{n} eval_time:\d+ms$", run["log"])
    [(exact_loss, exact_bpb)] = grab(r"^final_int8_zlib_roundtrip_exact val_loss:(\d+\.\d{8}) val_bpb:(\d+\.\d{8})$", run["log"])
    assert abs(exact_bpb - pre_bpb) < 5e-4 and abs(exact_loss - pre_loss) < 5e-4  # measured: -9e-5 and -1e-4
    assert abs(exact_loss - q_loss) <= 5.1e-5 and abs(exact_bpb - q_bpb) <= 5.1e-5  # same numbers, 4 vs 8 decimals


def test_wallclock_cap_stops_a_long_run_early(capped_run):
    log = capped_run["log"]
    [(train_ms, step)] = grab(r"^stopping_early: wallclock_cap train_time:(\d+)ms step:(\d+)/100000$", log)
    assert train_ms >= 3000 and 1 <= step < 100_000
    assert step in train_losses(log, 100_000)  # the capped step is logged
    assert len(grab(rf"^step:{int(step)}/100000 val_loss:{{n}} val_bpb:{{n}} ", log)) == 1


def test_zstd_compressor_writes_zstd_artifact_and_roundtrip_lines(capped_run):
    log, ptz = capped_run["log"], capped_run["cwd"] / "final_model.int8.ptz"
    assert ptz.read_bytes()[:4] == b"\x28\xb5\x2f\xfd"  # zstd frame magic
    [(model_bytes,)] = grab(r"^Serialized model int8\+zstd: (\d+) bytes", log)
    [(total_bytes,)] = grab(r"^Total submission size int8\+zstd: (\d+) bytes$", log)
    [(code_bytes,)] = grab(r"^Code size: (\d+) bytes$", log)
    assert model_bytes == ptz.stat().st_size and total_bytes == model_bytes + code_bytes
    assert len(grab(r"^final_int8_zstd_roundtrip val_loss:{n} val_bpb:{n} eval_time:\d+ms$", log)) == 1
    assert len(grab(r"^final_int8_zstd_roundtrip_exact val_loss:{n} val_bpb:{n}$", log)) == 1
    assert "zlib" not in log.split("=" * 100)[-1]
