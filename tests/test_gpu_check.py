"""bench/gpu_check.sh cannot run without a GPU, but what it needs can be checked here: it is valid
bash, every script, module and config it names exists, and the GPU benchmark it calls refuses a
machine without CUDA with a one-line error instead of a traceback."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "gpu_check.sh"


def test_gpu_check_is_valid_bash():
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("no bash")
    result = subprocess.run([bash, "-n", str(SCRIPT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_everything_gpu_check_calls_exists():
    text = SCRIPT.read_text()
    scripts = set(re.findall(r'"\$PY" ((?:bench/)?[\w/]+\.py)', text))
    modules = set(re.findall(r'"\$PY" -m ([\w.]+)', text)) - {"pytest"}
    tests = set(re.findall(r"\b(tests/[\w]+\.py)\b", text))
    globs = set(re.findall(r"\b(configs/[\w/]+/[\w*]+\.yaml)\b", text))
    assert {"bench/forward.py", "bench/recipe_throughput.py", "train.py", "infer.py"} <= scripts
    assert modules == {"gwi.physics.synth"} and tests and globs
    for path in scripts | tests | {"configs/smoke/gwi.yaml"}:
        assert (ROOT / path).is_file(), path
    for module in modules:
        assert (ROOT / (module.replace(".", "/") + ".py")).is_file(), module
    for pattern in globs:
        assert list(ROOT.glob(pattern)), pattern


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message a machine without CUDA gets")
def test_cuda_benchmark_without_cuda_is_a_one_line_error():
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "forward.py"), "--device", "cuda"],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 2
    assert result.stderr.strip() == "error: --device cuda: no CUDA device (torch.cuda.is_available() is False)"
