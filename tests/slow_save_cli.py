"""`python -m tests.slow_save_cli SECONDS FLAGS...`: the sakimi-next command line with every checkpoint's
saving paused for SECONDS after its model file is written, so that a test can kill the process while it
writes a checkpoint (the test hook lives here, not in the library)."""

import sys
import time

from sakimi_next import checkpoint
from sakimi_next.cli import main


def slowed(save_safetensors, seconds: float):
    def save_then_pause(tensors, path, metadata=None):
        save_safetensors(tensors, path, metadata=metadata)
        if str(path).endswith(checkpoint.MODEL_FILE):
            time.sleep(seconds)
    return save_then_pause


if __name__ == "__main__":
    checkpoint.save_safetensors = slowed(checkpoint.save_safetensors, float(sys.argv[1]))
    sys.exit(main(sys.argv[2:]))
