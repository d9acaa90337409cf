"""The main job: train a small hybrid model and print its val_bpb and artifact bytes.

    python tools/demo.py

Data: FineWeb shards when given (DATA_PATH and TOKENIZER_PATH set, or the challenge's default
./data/datasets/fineweb10B_sp1024 + ./data/tokenizers/fineweb_1024_bpe.model present); otherwise
the built-in corpus (Python's own documentation), built once into ./data/builtin with a tokenizer
trained on it. Model: on CUDA the challenge's default 9x512 model, on CPU the small CPU_PRESET below
(bench/bench_quality.py's preset `cpu`); either way block 0 is hybrid (HYMBA_LAYERS=0, the
best single block in the previous design's measurements, RESULTS.md).
Any env var you set (ITERATIONS=50, HYMBA_LAYERS=..., ...) overrides the demo's choice. Outputs, as
with train_gpt.py: logs/<RUN_ID>.txt, final_model.pt, final_model.int8.ptz in the repo root.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from logparse import final_numbers, parse_log
from make_dataset import builtin_shards

ROOT = Path(__file__).resolve().parents[1]
# The demo's model on a CPU (4 blocks x 128, 200 steps); one hybrid layer of four is a real share of it.
CPU_PRESET = dict(NUM_LAYERS=4, MODEL_DIM=128, NUM_HEADS=4, NUM_KV_HEADS=2, MLP_MULT=2, TRAIN_SEQ_LEN=256, TRAIN_BATCH_TOKENS=8192,
                  VAL_BATCH_SIZE=65536, ITERATIONS=200, WARMDOWN_ITERS=50, VAL_LOSS_EVERY=25)
FINEWEB = (ROOT / "data" / "datasets" / "fineweb10B_sp1024", ROOT / "data" / "tokenizers" / "fineweb_1024_bpe.model")
BUILTIN = (ROOT / "data" / "builtin" / "datasets" / "builtin_sp1024", ROOT / "data" / "builtin" / "tokenizers" / "builtin_1024_bpe.model")


def pick_data() -> tuple[str, str, str]:
    """(DATA_PATH, TOKENIZER_PATH, description)."""
    if "DATA_PATH" in os.environ or "TOKENIZER_PATH" in os.environ:
        return os.environ.get("DATA_PATH", str(FINEWEB[0])), os.environ.get("TOKENIZER_PATH", str(FINEWEB[1])), "the shards you gave"
    if any(FINEWEB[0].glob("fineweb_val_*.bin")) and FINEWEB[1].exists():
        return str(FINEWEB[0]), str(FINEWEB[1]), "FineWeb sp1024 shards in ./data"
    data, tokenizer = BUILTIN
    if not any(data.glob("fineweb_val_*.bin")):
        print(f"building the built-in corpus into {data.parent.parent} (once) ...", flush=True)
    builtin_shards(data, tokenizer, quiet=False)
    return str(data), str(tokenizer), "the built-in corpus (Python's documentation; no FineWeb)"


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args(argv)
    import torch  # here, not at the top: the benchmarks import CPU_PRESET without it

    data, tokenizer, what = pick_data()
    cuda = torch.cuda.is_available()
    demo = dict(HYMBA_LAYERS="0", MAX_WALLCLOCK_SECONDS="600") if cuda else {**CPU_PRESET, "HYMBA_LAYERS": "0", "WARMUP_STEPS": 0,
                                                                           "MAX_WALLCLOCK_SECONDS": 0, "TRAIN_LOG_EVERY": 25}
    env = {**{k: str(v) for k, v in demo.items()}, **os.environ, "DATA_PATH": data, "TOKENIZER_PATH": tokenizer}
    env.setdefault("RUN_ID", "demo")
    print(f"training on {what} ({'CUDA' if cuda else 'CPU'}); settings: "
          + " ".join(f"{k}={env[k]}" for k in demo), flush=True)
    proc = subprocess.run([sys.executable, str(ROOT / "train_gpt.py")], cwd=ROOT, env=env)
    if proc.returncode != 0:
        return proc.returncode
    result = final_numbers(parse_log(ROOT / "logs" / f"{env['RUN_ID']}.txt"))
    print(f"\ndemo: val_bpb {result['val_bpb']:.4f} after the int8 roundtrip (pre-quant {result['pre_quant_val_bpb']:.4f}) "
          f"at step {result['step_stop']}; artifact {result['bytes_total']:,} bytes = model {result['bytes_model']:,} "
          f"+ code {result['bytes_code']:,}; log logs/{env['RUN_ID']}.txt")
    return 0


if __name__ == "__main__":
    sys.exit(main())
