"""The artifact limit drops to 1,000 bytes, so every artifact is over budget."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import train_gpt  # noqa: E402

train_gpt.ARTIFACT_LIMIT_BYTES = 1000
train_gpt.main()
