"""The offline Kaggle bundle: built from a real checkpoint, its notebook installs from the bundled
wheel with no index and writes a valid submission for a generated test folder."""
from __future__ import annotations

import json
import subprocess
import sys

from conftest import clean_env
from gwi.kaggle import bundle, notebook_code
from gwi.submission import HEADER, validate_submission
from gwi_files import write_test_dir


def test_bundle_notebook_reproduces_a_submission_offline(tmp_path, gwi_smoke_run):
    out = tmp_path / "bundle"
    summary = bundle([str(gwi_smoke_run)], out, dependency_wheels=())
    assert [name.split("-")[0] for name in summary["wheels"]] == ["kagglerig"]
    (checkpoint,) = (out / "checkpoints").iterdir()
    assert sorted(p.name for p in checkpoint.iterdir()) == ["meta.json", "weights.safetensors"]
    notebook = json.loads((out / "submission.ipynb").read_text())
    assert notebook["nbformat"] == 4 and len(notebook["cells"]) == 3

    test_dir = write_test_dir(tmp_path / "test", ["a0", "b1"])
    site = tmp_path / "site"
    code = notebook_code(out / "submission.ipynb", BUNDLE=str(out), TEST_DIR=str(test_dir),
                         OUT=str(tmp_path / "submission.csv"), PIP_TARGET=str(site), BATCH_SIZE=2)
    # Run from an empty folder with the repository off the path: the code must come from the wheel.
    env = clean_env(PIP_NO_INDEX="1", PYTHONPATH="", PIP_DISABLE_PIP_VERSION_CHECK="1")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert (site / "gwi" / "kaggle.py").exists()
    assert f"harness from {site / 'harness'}" in result.stdout  # the wheel's code, not the checkout's
    assert "rows" in result.stdout
    validate_submission(tmp_path / "submission.csv", ["a0", "b1"])
    assert (tmp_path / "submission.csv").read_text().startswith(HEADER)
