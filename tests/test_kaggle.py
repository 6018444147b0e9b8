"""The offline Kaggle bundle (harness.kaggle) for any task: built from real checkpoints, its notebook
installs from the bundled wheel with no index and runs infer.py with every bundled checkpoint: a
valid submission for a generated gwi test folder; a cnn k-fold run on image files (make test-all)."""
from __future__ import annotations

import json
import runpy
import subprocess
import sys

import pytest

from conftest import CNN_FOLDER_ARGS, SMOKE_CNN, clean_env, infer_here, train_here
from gwi.submission import HEADER, validate_submission
from gwi_files import write_test_dir
from harness.kaggle import bundle, copy_checkpoints, notebook, notebook_code
from harness.task import get_task
from image_files import write_folder, write_sample_submission, write_test_folder

CNN_FOLDS = [str(SMOKE_CNN), "data.fold=all", "data.folds=2", "data.num_train=64", "trainer.epochs=1",
             "trainer.batch_size=16", "sched.name=cosine", "log.wandb=disabled", "log.plot=false", "log.progress=none"]


def run_notebook(bundle_dir, tmp_path, **parameters) -> subprocess.CompletedProcess:
    """The bundle's notebook code, run from an empty folder with the repository off the path and no
    package index: the code must come from the wheel."""
    site = tmp_path / "site"
    code = notebook_code(bundle_dir / "submission.ipynb", BUNDLE=str(bundle_dir), PIP_TARGET=str(site), BATCH_SIZE=2,
                         **parameters)
    env = clean_env(PIP_NO_INDEX="1", PYTHONPATH="", PIP_DISABLE_PIP_VERSION_CHECK="1")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert f"harness from {site / 'harness'}" in result.stdout  # the wheel's code, not the checkout's
    return result


def test_bundle_notebook_reproduces_a_submission_offline(tmp_path, gwi_smoke_run):
    out = tmp_path / "bundle"
    summary = bundle([str(gwi_smoke_run)], out, dependency_wheels=())
    assert summary["task"] == "gwi" and [name.split("-")[0] for name in summary["wheels"]] == ["kagglerig"]
    (checkpoint,) = (out / "checkpoints").iterdir()
    assert sorted(p.name for p in checkpoint.iterdir()) == ["meta.json", "weights.safetensors"]
    assert (out / "infer.py").is_file()
    notebook_json = json.loads((out / "submission.ipynb").read_text())
    assert notebook_json["nbformat"] == 4 and len(notebook_json["cells"]) == 3
    parameters = "".join(notebook_json["cells"][0]["source"])  # the task's defaults
    assert "TEST_DIR = '/kaggle/input/waveform-inversion/test'" in parameters and "INFER_ARGS = ['--tta', 'flip']" in parameters

    test_dir = write_test_dir(tmp_path / "test", ["a0", "b1"])
    result = run_notebook(out, tmp_path, TEST_DIR=str(test_dir), OUT=str(tmp_path / "submission.csv"))
    assert (tmp_path / "site" / "gwi" / "kaggle.py").exists()
    assert '"rows": 140' in result.stdout
    validate_submission(tmp_path / "submission.csv", ["a0", "b1"])
    assert (tmp_path / "submission.csv").read_text().startswith(HEADER)


@pytest.fixture
def cnn_folds_run(tmp_path, capsys):
    root = tmp_path / "cv"
    result = train_here(capsys, *CNN_FOLDS, f"output_dir={root}")
    assert result.returncode == 0, result.stderr
    return root


def test_a_folds_run_bundles_every_fold_with_its_tasks_notebook(tmp_path, cnn_folds_run):
    kept = tmp_path / "checkpoints"
    assert copy_checkpoints([str(cnn_folds_run)], kept) == "cnn"
    assert sorted(p.name for p in kept.iterdir()) == ["00-fold_0-best", "01-fold_1-best"]
    cnn = get_task("cnn")
    cells = notebook("my-bundle", cnn.kaggle_test_dir, list(cnn.kaggle_infer_args))["cells"]
    assert 'BUNDLE = "/kaggle/input/my-bundle"' in "".join(cells[0]["source"])
    assert "infer.main(args)" in "".join(cells[2]["source"])
    assert cnn.kaggle_wheels == ("timm",)


def test_python_m_gwi_kaggle_is_the_same_command(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["gwi.kaggle", "bundle", "--checkpoint", str(tmp_path / "none"), "--out", str(tmp_path / "b")])
    with pytest.raises(SystemExit) as stopped:
        runpy.run_module("gwi.kaggle", run_name="__main__")
    assert stopped.value.code == 2
    assert capsys.readouterr().err.startswith(f"error: --checkpoint {tmp_path / 'none'}: no complete checkpoint")


@pytest.mark.slow
def test_an_image_folds_bundle_writes_a_submission_offline(tmp_path, capsys):
    """A k-fold run on a folder of images, bundled: the notebook's fold ensemble answers the sample
    submission with no package index, as infer.py does here."""
    write_folder(tmp_path / "train", per_class=4)
    root = tmp_path / "cv"
    done = train_here(capsys, SMOKE_CNN, *CNN_FOLDER_ARGS, f"data.root={tmp_path / 'train'}", f"output_dir={root}",
                      "data.fold=all", "data.folds=2", "trainer.epochs=1", "sched.name=cosine")
    assert done.returncode == 0, done.stderr
    out = tmp_path / "bundle"
    summary = bundle([str(root)], out, dependency_wheels=())
    assert summary["task"] == "cnn" and len(summary["checkpoints"]) == 2
    ids, _ = write_test_folder(tmp_path / "test", count=4)
    write_sample_submission(tmp_path / "sample.csv", ids, header=("id", "label"))
    result = run_notebook(out, tmp_path, TEST_DIR=str(tmp_path / "test"), OUT=str(tmp_path / "submission.csv"),
                          INFER_ARGS=["--sample-submission", str(tmp_path / "sample.csv"), "--num-workers", "0"])
    assert "submission" in result.stdout
    here = infer_here(capsys, "--checkpoint", root, "--data", tmp_path / "test", "--out", tmp_path / "here.csv",
                      "--sample-submission", tmp_path / "sample.csv", "--num-workers", "0")
    assert here.returncode == 0, here.stderr
    assert (tmp_path / "submission.csv").read_text() == (tmp_path / "here.csv").read_text()
