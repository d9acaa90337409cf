"""Rank 1 raises RuntimeError('injected fault on rank 1') while rank 0 goes on into a collective:
FAULT_AT=train at rank 1's 2nd training step (rank 0 waits in DDP's gradient all-reduce), FAULT_AT=eval
in the final eval_val (rank 0 waits in its all-reduce of the sums). Run it under torch.distributed.run."""
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import train_gpt  # noqa: E402

RANK1 = os.environ.get("RANK") == "1"
forward, eval_val, train_calls = train_gpt.GPT.forward, train_gpt.eval_val, 0


def faulty_forward(self, input_ids, target_ids):
    global train_calls
    if self.training and RANK1:
        train_calls += 1
        if train_calls > 8 // int(os.environ["WORLD_SIZE"]):  # the first micro-step of step 2
            raise RuntimeError("injected fault on rank 1")
    return forward(self, input_ids, target_ids)


def faulty_eval_val(*args, **kwargs):
    if RANK1:
        raise RuntimeError("injected fault on rank 1")
    return eval_val(*args, **kwargs)


if os.environ["FAULT_AT"] == "train":
    train_gpt.GPT.forward = faulty_forward
else:
    train_gpt.eval_val = faulty_eval_val
train_gpt.main()
