"""Only rank 0 keeps MAX_WALLCLOCK_SECONDS (the others run uncapped), so the ranks stop together only
if rank 0's cap reaches them. Each rank prints `rank:R steps:N`, the number of steps it trained."""
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import train_gpt  # noqa: E402

if os.environ["RANK"] != "0":
    os.environ["MAX_WALLCLOCK_SECONDS"] = "0"
lr_multiplier, steps = train_gpt.lr_multiplier, 0


def counting_lr_multiplier(args, step, elapsed_ms):
    global steps
    steps = step + 1  # called once before each training step
    return lr_multiplier(args, step, elapsed_ms)


train_gpt.lr_multiplier = counting_lr_multiplier
train_gpt.main()
# one write per line: with PYTHONUNBUFFERED, print() writes text and newline apart, and two ranks finishing
# together on one pipe could interleave them ("rank:1 steps:8rank:0 steps:8")
sys.stdout.write(f"rank:{os.environ['RANK']} steps:{steps}\n")
sys.stdout.flush()
