"""infer.py rebuilds models from checkpoints alone and reproduces the metric training logged."""
from __future__ import annotations

import json

import pytest

import infer
from conftest import SMOKE_GWI, infer_here, read_metrics, run_entry, train_here
from harness import checkpoint as ckpt


def test_gwi_smoke_run_then_infer_reproduces_the_best_metric(tmp_path, capsys):
    run = tmp_path / "gwi"
    result = train_here(capsys, SMOKE_GWI, f"output_dir={run}", "log.wandb=disabled")
    assert result.returncode == 0, result.stderr
    evals = [r for r in read_metrics(run) if "val/mae" in r]
    assert evals and all(0 < r["val/mae"] < 3000 and 0 < r["val/mae_odd"] < 3000 for r in evals)
    assert "val_raw/mae" in evals[-1]  # the smoke config trains with EMA
    assert (run / "metrics.png").stat().st_size > 10_000

    best = ckpt.read_meta(ckpt.resolve(run))
    assert best["monitor_value"] == min(r["val/mae"] for r in evals)
    single = run_entry("infer.py", "--checkpoint", run)  # the command itself, from the shell
    assert single.returncode == 0, single.stderr
    assert json.loads(single.stdout)["val/mae"] == pytest.approx(best["monitor_value"], rel=1e-5)

    # Two checkpoints average into an ensemble (best + last differ, so the metric is its own).
    both = infer_here(capsys, "--checkpoint", run, "--checkpoint", run / "checkpoints" / "last", "--batch-size", "5")
    assert both.returncode == 0, both.stderr
    assert len(json.loads(both.stdout)["checkpoints"]) == 2


def test_infer_names_a_missing_checkpoint(tmp_path, capsys):
    result = infer_here(capsys, "--checkpoint", tmp_path / "nothing")
    assert result.returncode == 2
    assert f"--checkpoint {tmp_path / 'nothing'}: no complete checkpoint" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("flags, named", [
    (["--tta", "flip"], "--tta: it acts only with --data"),
    (["--out", "submission.csv"], "--out: it acts only with --data"),
    (["--save-predictions", "oof.npy"], "--save-predictions: it acts only with --data"),
    (["--num-workers", "4"], "--num-workers: it acts only with --data"),
    (["--tta", "flip", "--out", "submission.csv"], "--tta / --out: they act only with --data"),
])
def test_infer_refuses_flags_that_act_on_data_only_without_data(gwi_smoke_run, tmp_path, capsys, flags, named):
    """Without --data the validation data is evaluated; a flag that would do nothing there is an error."""
    assert infer.main(["--checkpoint", str(gwi_smoke_run), *[str(tmp_path / f) if f.endswith((".csv", ".npy")) else f
                                                             for f in flags]]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith(f"error: {named} DIR") and captured.err.count("\n") == 1 and "Traceback" not in captured.err
    assert captured.out == "" and not any(tmp_path.iterdir())  # nothing evaluated, nothing written
