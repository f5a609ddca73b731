"""Run the `dnas` command's `bench` on a tiny NB201 supernet in a fresh process."""
import json
import os
import subprocess
import sys


def tiny_bench(env_extra: dict, clear: tuple = ()) -> dict:
    """The JSON `python -m dnas.cli bench` prints for C=2, one cell, B=4, 8×8 inputs, with the
    environment variables in ``clear`` removed and ``env_extra`` added."""
    env = {k: v for k, v in os.environ.items() if k not in clear}
    env.update(env_extra)
    out = subprocess.run([sys.executable, "-m", "dnas.cli", "bench", "--channels", "2", "--cells", "1",
                          "--batch-size", "4", "--image-size", "8", "--steps", "1", "--warmup", "0"],
                         capture_output=True, text=True, env=env, check=True, timeout=600)
    return json.loads(out.stdout.strip().splitlines()[-1])
