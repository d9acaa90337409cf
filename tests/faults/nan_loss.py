"""The model's loss turns NaN from training step 3 on (steps 1 and 2 are finite)."""
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import train_gpt  # noqa: E402

forward, train_calls = train_gpt.GPT.forward, 0


def nan_forward(self, input_ids, target_ids):
    global train_calls
    loss = forward(self, input_ids, target_ids)
    if self.training:
        train_calls += 1
        if train_calls > 2 * (8 // int(os.environ.get("WORLD_SIZE", "1"))):  # past the micro-steps of steps 1-2
            return loss * float("nan")
    return loss


train_gpt.GPT.forward = nan_forward
train_gpt.main()
