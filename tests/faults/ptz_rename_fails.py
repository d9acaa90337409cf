"""The export dies between writing final_model.int8.ptz's temporary file and renaming it."""
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import train_gpt  # noqa: E402

replace = os.replace


def failing_replace(src, dst, *args, **kwargs):
    if str(dst).endswith(".ptz"):
        raise OSError("injected fault: rename of the .ptz failed")
    return replace(src, dst, *args, **kwargs)


os.replace = failing_replace
train_gpt.main()
