"""benchmarks/gpu.py (`make bench`) without a CUDA device: one skip line, exit status 0."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_without_cuda_prints_one_skip_line(tmp_path):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "benchmarks/gpu.py: skipped, no CUDA device\n"
    assert not (tmp_path / "out").exists()
