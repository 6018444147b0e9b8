"""gwi inference: the Kaggle submission CSV (exact format, validated before success), flip TTA, and
scoring a labelled folder with per-family MAE and saved predictions."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import infer_here, run_entry
from gwi.data import SeismicPairs
from gwi.layout import find_pairs
from gwi.submission import HEADER, format_rows, validate_submission
from gwi_files import write_test_dir, write_tree
from harness.errors import UserError
from harness.inference import load_ensemble

TEST_IDS = ["000039dca2", "0a1b2c3d4e", "ffe0c1d2b3"]


def test_format_rows_is_the_kaggle_layout():
    velocity = np.full((2, 70, 70), 3000.0, np.float32)
    velocity[0, 0, 1], velocity[0, 0, 3], velocity[0, 69, 69] = 1499.0, 4499.96, 2222.04
    velocity[1, 5, 0] = np.nan  # even columns are not submitted
    lines = format_rows(["a1", "b2"], velocity).decode().splitlines()
    assert len(lines) == 140
    assert lines[0].startswith("a1_y_0,1500.0,4500.0,3000.0,") and lines[0].count(",") == 35
    assert lines[69].endswith(",2222.0") and lines[70].startswith("b2_y_0,3000.0")
    assert HEADER.startswith("oid_ypos,x_1,x_3,") and HEADER.endswith(",x_67,x_69\n")


def test_submission_for_a_test_folder_matches_the_model_and_is_validated(tmp_path, gwi_smoke_run):
    test_dir = write_test_dir(tmp_path / "test", TEST_IDS)
    out = tmp_path / "sub" / "submission.csv"
    result = run_entry("infer.py", "--checkpoint", gwi_smoke_run, "--data", test_dir, "--out", out, "--tta", "flip",
                       "--batch-size", "2", "--num-workers", "0")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["rows"] == 3 * 70
    lines = out.read_text().splitlines()
    assert lines[0] + "\n" == HEADER and len(lines) == 1 + 3 * 70
    assert [line.split(",")[0] for line in lines[1:71:69]] == ["000039dca2_y_0", "000039dca2_y_69"]
    submitted = np.array([line.split(",")[1:] for line in lines[1:]], dtype=np.float64).reshape(3, 70, 35)

    task, _, model = load_ensemble([str(gwi_smoke_run)])
    task.tta = "flip"
    seismic = torch.stack([torch.from_numpy(np.load(test_dir / f"{i}.npy")) for i in TEST_IDS])
    with torch.no_grad():
        expected = task.predict(model.eval(), (seismic,))[:, 0, :, 1::2].numpy()
    np.testing.assert_allclose(submitted, expected, atol=0.051)  # written to 0.1 m/s
    task.tta = "none"
    with torch.no_grad():
        plain = task.predict(model, (seismic,))[:, 0, :, 1::2].numpy()
    assert np.abs(plain - expected).max() > 0.1  # the flip TTA changed the answer


def test_validation_rejects_broken_submissions(tmp_path):
    good = tmp_path / "good.csv"
    good.write_bytes(HEADER.encode() + format_rows(TEST_IDS[:2], np.full((2, 70, 70), 2000.0, np.float32)))
    validate_submission(good, TEST_IDS[:2])
    text = good.read_text()
    for broken, message in [(text.replace("x_69", "x_70"), "wrong header"),
                            (text.rsplit("\n", 2)[0] + "\n", "139 rows, expected 140"),
                            (text.replace("2000.0\n", "nan\n", 1), "values outside"),
                            (text.replace(",2000.0\n", "\n", 1), "fields")]:
        good.write_text(broken)
        with pytest.raises(UserError, match=message):
            validate_submission(good, TEST_IDS[:2])
    with pytest.raises(UserError, match="out of order"):
        validate_submission(_write(tmp_path / "reversed.csv", TEST_IDS[:2][::-1]), TEST_IDS[:2])


def _write(path, ids):
    path.write_bytes(HEADER.encode() + format_rows(ids, np.full((len(ids), 70, 70), 2000.0, np.float32)))
    return path


def test_labelled_folder_reports_per_family_mae_and_saves_predictions(tmp_path, gwi_smoke_run, capsys):
    tree = write_tree(tmp_path / "labelled")
    saved = tmp_path / "oof.npy"
    result = infer_here(capsys, "--checkpoint", gwi_smoke_run, "--data", tree, "--save-predictions", saved, "--num-workers", "0")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    predictions = np.load(saved)
    dataset = SeismicPairs(find_pairs([tree]), ["CurveFault_A", "FlatVel_A"])
    truth = np.stack([dataset[i][1].numpy() for i in range(len(dataset))])
    families = np.array([dataset[i][2] for i in range(len(dataset))])
    assert predictions.shape == (12, 1, 70, 70) and report["samples"] == 12
    errors = np.abs(predictions - truth).reshape(12, -1).mean(1)
    assert report["mae"] == pytest.approx(errors.mean(), rel=1e-5)
    assert report["mae_FlatVel_A"] == pytest.approx(errors[families == 1].mean(), rel=1e-5)
    assert report["mae_odd"] == pytest.approx(np.abs(predictions - truth)[..., 1::2].mean(), rel=1e-5)


def test_test_folder_errors_name_the_problem(tmp_path, gwi_smoke_run, capfd):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "FlatVel_A").mkdir()
    result = infer_here(capfd, "--checkpoint", gwi_smoke_run, "--data", empty, "--out", tmp_path / "s.csv")
    # Neither layout: the message says what a test folder and a labelled folder look like (issue 15).
    assert result.returncode == 2 and f"--data {empty}: no data found; expected a test folder of <id>.npy files" in result.stderr
    assert "<Family>/data/dataN.npy + <Family>/model/modelN.npy" in result.stderr
    bad = write_test_dir(tmp_path / "bad", ["aaa"])
    np.save(bad / "bbb.npy", np.zeros((5, 999, 70), np.float32))
    result = infer_here(capfd, "--checkpoint", gwi_smoke_run, "--data", bad, "--out", tmp_path / "s.csv", "--num-workers", "1")
    assert result.returncode == 2 and "bbb.npy: shape (5, 999, 70), expected (5, 1000, 70)" in result.stderr
    assert "Traceback" not in result.stderr  # raised in a DataLoader worker, reported as one line
    assert not (tmp_path / "s.csv").exists()
