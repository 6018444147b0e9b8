"""Checkpoints as W&B artifacts: logged while a run trains (`log.upload_checkpoints`), and fetched back
for inference with `--checkpoint wandb:ENTITY/PROJECT/NAME:ALIAS`.

Every W&B run has one artifact of type "model", `model-<run id>` (the same across resumes), whose
versions are the checkpoints it logged, with aliases `best`, `last` and `step-N` (W&B adds `latest`
and `vN`). A checkpoint is logged by the main process only once it is complete on disk (renamed into
place, meta.json written). W&B copies the files into its staging folder before `log_artifact`
returns, so the loop may replace the directory at once; online the upload then runs in the background
(the run's end waits for it), offline the copies wait for `wandb sync`.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import wandb

from harness.checkpoint import read_meta
from harness.errors import UserError
from harness.tracking import configured_wandb_mode, has_wandb_credentials, wandb_server_unreachable

ARTIFACT_TYPE = "model"
SPEC_PREFIX = "wandb:"
API_TIMEOUT_S = 20  # an unreachable server fails after this, not after wandb's own long retries


def artifact_name(run) -> str:
    return f"model-{run.id}"


class CheckpointUploader:
    """Logs checkpoints as they are saved: `best` logs each new best checkpoint; `last` logs those and
    every `last` (the full training state, to resume on another machine); `none` logs nothing.
    Every process may call it; only the main process, which holds the W&B run, acts."""

    def __init__(self, accelerator, which: str):
        has_wandb = any(tracker.name == "wandb" for tracker in accelerator.trackers)
        wanted = which != "none" and accelerator.is_main_process and has_wandb
        self.run = accelerator.get_tracker("wandb", unwrap=True) if wanted else None
        self.which = which

    def best_saved(self, checkpoint_dir: Path, step: int) -> None:
        """After `Checkpointer.save_best` kept this step: log `best` if this step became the best
        (a top-k entry below the best is not logged)."""
        best = Path(checkpoint_dir) / "best"
        if self.run is not None and read_meta(best)["step"] == step:
            self._log(best, "best", step)

    def last_saved(self, last_dir: Path, step: int) -> None:
        if self.run is not None and self.which == "last":
            self._log(Path(last_dir), "last", step)

    def _log(self, directory: Path, alias: str, step: int) -> None:
        meta = {key: value for key, value in read_meta(directory).items() if key != "config"}  # config is in meta.json
        artifact = wandb.Artifact(artifact_name(self.run), type=ARTIFACT_TYPE, metadata=_finite(meta))
        for path in sorted(p for p in directory.rglob("*") if p.is_file()):
            artifact.add_file(str(path), name=path.relative_to(directory).as_posix())
        try:
            self.run.log_artifact(artifact, aliases=[alias, f"step-{step}"])
        except Exception as err:  # the checkpoint is safe on disk: a failed upload must not end training
            print(f"W&B: could not log {directory} as an artifact ({err}); training goes on", file=sys.stderr)


def _finite(value):
    """JSON-safe metadata: NaN/inf (a diverged metric) become strings, as in metrics.jsonl."""
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def resolve_checkpoint(spec: str) -> str:
    """A --checkpoint argument -> a local path. `wandb:ENTITY/PROJECT/NAME:ALIAS` (ALIAS e.g. best,
    last, step-120, v3) is downloaded into W&B's artifact folder (./artifacts/ unless
    WANDB_ARTIFACT_DIR says otherwise); any other argument is already a path and comes back as given."""
    spec = str(spec)
    if not spec.startswith(SPEC_PREFIX):
        return spec
    reference = spec[len(SPEC_PREFIX):]
    parts = reference.split("/")
    if len(parts) != 3 or not all(parts) or ":" not in parts[2] or not all(parts[2].split(":", 1)):
        raise UserError(f"--checkpoint {spec}: expected wandb:ENTITY/PROJECT/NAME:ALIAS, "
                        "e.g. wandb:my-team/kagglerig/model-1a2b3c4d:best")
    fetch_elsewhere = (f"or fetch it where W&B is reachable (`wandb artifact get {reference} --root DIR`) "
                       "and pass --checkpoint DIR")
    mode = configured_wandb_mode("online")
    if mode != "online":
        raise UserError(f"--checkpoint {spec}: W&B is {mode} here (WANDB_MODE / WANDB_DISABLED) and cannot download "
                        f"artifacts: unset them, {fetch_elsewhere}")
    if not has_wandb_credentials():
        raise UserError(f"--checkpoint {spec}: downloading a W&B artifact needs an API key (WANDB_API_KEY "
                        f"or `wandb login`): none found; log in, {fetch_elsewhere}")
    import wandb  # only an artifact download needs wandb itself

    server, reason = wandb_server_unreachable()
    if reason:
        raise UserError(f"--checkpoint {spec}: could not download the W&B artifact: cannot connect to {server} "
                        f"({reason}); {fetch_elsewhere}")
    try:
        artifact = wandb.Api(timeout=API_TIMEOUT_S).artifact(reference, type=ARTIFACT_TYPE)
        return artifact.download()
    except Exception as err:  # no network, server down, unknown artifact or alias, no access: say which
        reason = str(err).strip().splitlines()[0].rstrip(".") if str(err).strip() else type(err).__name__
        raise UserError(f"--checkpoint {spec}: could not download the W&B artifact: {reason}; "
                        f"check the name and alias in the W&B UI, {fetch_elsewhere}") from None
