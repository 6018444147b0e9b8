"""Checkpoints as W&B model artifacts (log.upload_checkpoints), read back from the offline run's log, and
`--checkpoint wandb:...` failing with a clear message where W&B cannot be reached."""
from __future__ import annotations

from pathlib import Path

import pytest

from conftest import SMOKE_CNN, clean_env, read_metrics, run_entry, train_here, wandb_artifacts, wandb_run
from harness import checkpoint as ckpt
from harness.artifacts import resolve_checkpoint
from harness.errors import UserError

SPEC = "wandb:my-team/kagglerig/model-1a2b3c4d:best"


def offline_env(tmp_path: Path, **extra) -> dict:
    # W&B's staging copies and cache go to the test's folder, not the home directory.
    return clean_env(WANDB_DATA_DIR=str(tmp_path / "wandb-data"), WANDB_CACHE_DIR=str(tmp_path / "wandb-cache"), **extra)


def steps_that_set_a_new_best(run_dir: Path, monitor: str) -> list[int]:
    steps, best = [], None
    for row in read_metrics(run_dir):
        if monitor in row and (best is None or row[monitor] > best):
            steps.append(row["step"])
            best = row[monitor]
    return steps


# "best" in the default run; "none" and "last" under test-all.
@pytest.mark.parametrize("which", [pytest.param("none", marks=pytest.mark.slow), "best", pytest.param("last", marks=pytest.mark.slow)])
def test_checkpoints_are_logged_as_model_artifacts_once_complete(which, tmp_path):
    run_dir = tmp_path / "run"
    result = run_entry("train.py", SMOKE_CNN, f"output_dir={run_dir}", "trainer.epochs=2",
                       f"log.upload_checkpoints={which}", env=offline_env(tmp_path))
    assert result.returncode == 0, result.stderr
    run, _ = wandb_run(run_dir)
    logged = wandb_artifacts(run_dir)
    if which == "none":
        assert logged == []
        return
    assert {(a["name"], a["type"]) for a in logged} == {(f"model-{run['run_id']}", "model")}

    # best: every evaluation that set a new best, as it happened; its files are the best checkpoint's.
    bests = [a for a in logged if "best" in a["aliases"]]
    assert [a["metadata"]["step"] for a in bests] == steps_that_set_a_new_best(run_dir, "val/acc")
    assert all(f"step-{a['metadata']['step']}" in a["aliases"] for a in bests)
    assert set(bests[-1]["files"]) == {ckpt.WEIGHTS, ckpt.META}
    assert bests[-1]["metadata"]["monitor_value"] == ckpt.read_meta(run_dir / "checkpoints" / "best")["monitor_value"]
    assert "config" not in bests[-1]["metadata"]  # it is in meta.json, inside the artifact

    lasts = [a for a in logged if "last" in a["aliases"]]
    if which == "best":
        assert lasts == []
        return
    # last: after each epoch and at the end (2 epochs of 8 updates), with the full training state.
    assert [(a["metadata"]["step"], a["metadata"]["reason"]) for a in lasts] == [(8, "epoch"), (16, "epoch"), (16, "finished")]
    final = run_dir / "checkpoints" / "last"
    assert set(lasts[-1]["files"]) == {p.name for p in final.iterdir()}
    assert {"optimizer.bin", "model.safetensors", ckpt.WEIGHTS, ckpt.META} <= set(lasts[-1]["files"])
    # The staged copies `wandb sync` uploads are the checkpoint as it was when logged, although the
    # loop has replaced `last` since (the first one is from step 8).
    for name, (size, staged) in lasts[-1]["files"].items():
        assert Path(staged).read_bytes() == (final / name).read_bytes(), name
    first_meta = Path(lasts[0]["files"][ckpt.META][1])
    assert '"step": 8' in first_meta.read_text() and ckpt.read_meta(final)["step"] == 16


def test_uploads_without_wandb_are_a_config_error(tmp_path, capsys):
    result = train_here(capsys, SMOKE_CNN, f"output_dir={tmp_path}", "log.wandb=disabled", "log.upload_checkpoints=best")
    assert result.returncode == 2
    assert "log.upload_checkpoints=best logs W&B artifacts" in result.stderr and "Traceback" not in result.stderr


def test_a_local_checkpoint_path_is_returned_as_given():
    assert resolve_checkpoint("outputs/demo") == "outputs/demo"
    assert resolve_checkpoint(Path("outputs/demo/checkpoints/best")) == "outputs/demo/checkpoints/best"


@pytest.mark.parametrize("spec", ["wandb:model-1a2b3c4d:best", "wandb:my-team/kagglerig/model-1a2b3c4d", "wandb:a//b:c"])
def test_a_malformed_wandb_checkpoint_names_the_expected_form(spec):
    with pytest.raises(UserError, match="expected wandb:ENTITY/PROJECT/NAME:ALIAS"):
        resolve_checkpoint(spec)


def test_a_wandb_checkpoint_without_an_api_key_says_so(monkeypatch, tmp_path):
    for name in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_MODE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    with pytest.raises(UserError, match="needs an API key"):
        resolve_checkpoint(SPEC)


@pytest.mark.slow  # the no-network case of the same path stays in the default run
def test_infer_with_a_wandb_checkpoint_offline_exits_2_with_a_message():
    result = run_entry("infer.py", "--checkpoint", SPEC, env=clean_env(WANDB_MODE="offline"))
    assert result.returncode == 2
    assert f"error: --checkpoint {SPEC}: W&B is offline here" in result.stderr
    assert "wandb artifact get my-team/kagglerig/model-1a2b3c4d:best" in result.stderr  # how to fetch it elsewhere
    assert "Traceback" not in result.stderr


def test_infer_with_a_wandb_checkpoint_and_no_network_exits_2_with_a_message(tmp_path):
    # A key, but the server address is a closed local port: what a machine without network sees.
    env = offline_env(tmp_path, WANDB_API_KEY="0" * 40, WANDB_BASE_URL="http://127.0.0.1:9")
    result = run_entry("infer.py", "--checkpoint", SPEC, env=env, timeout=120)
    assert result.returncode == 2
    assert f"error: --checkpoint {SPEC}: could not download the W&B artifact" in result.stderr
    assert "Traceback" not in result.stderr
