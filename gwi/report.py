"""The demo's report after training on simulated data (`GwiTask.after_training`, data.source=simulated,
main process): the run's best checkpoint predicts the cache's test/ folder (gwi/simulated.py) with
flip TTA into `<run_dir>/submission.csv` through the validated Kaggle writer; that CSV is read back
and scored against the true maps with the Kaggle metric (MAE over the odd columns), overall and per
family, next to the MAE of always predicting the mean training map; and `<run_dir>/predictions.png`
shows a few test samples: two shots, true map, predicted map, error. The numbers are printed and,
when the run logs to W&B, logged there with the picture.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np
import torch
import wandb
from tqdm.auto import tqdm

from gwi.layout import SOURCE_X, find_pairs
from gwi.simulated import cache_folder, label_files
from gwi.submission import read_submission, write_submission
from harness.errors import UserError
from harness.inference import load_ensemble
from harness.tracking import read_metrics

matplotlib.use("Agg")  # files only: no display on rented machines
import matplotlib.pyplot as plt  # noqa: E402

PICTURE_SHOTS = (0, 2)  # the first source (x = 0) and the middle one (x = 34)
PICTURE_PER_FAMILY = 2


def val_mae_curve(run_dir: Path) -> list[float]:
    """val/mae at every evaluation of the run, from its metrics.jsonl."""
    return [row["val/mae"] for row in read_metrics(run_dir) if "val/mae" in row]


def mean_training_map(folder: Path) -> np.ndarray:
    """The mean (70, 70) velocity map of the training split: the baseline a model must beat."""
    maps = [np.load(pair.velocity, mmap_mode="r") for pair in find_pairs([folder / "train"])]
    return (sum(m.astype(np.float64).sum(axis=0) for m in maps) / sum(len(m) for m in maps))[0]


def report(cfg, run_dir: Path, accelerator) -> dict:
    """Predict, write, score and picture the simulated test set (see the module docstring), on the
    main process; every process returns once it is done. Returns the summary entries."""
    if cfg.data.num_test == 0:
        return {}
    summary = _report(cfg, Path(run_dir), accelerator) if accelerator.is_main_process else {}
    accelerator.wait_for_everyone()  # no process tears the process group down while the main one works
    return summary


def _report(cfg, run_dir: Path, accelerator) -> dict:
    folder = cache_folder(cfg.data)
    labels = label_files(folder)
    task, _, model = load_ensemble([str(run_dir)])  # the run's best checkpoint, rebuilt from its own config
    task.tta = "flip"
    device = accelerator.device
    model = model.to(device).eval()
    submission = run_dir / "submission.csv"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.trainer.mixed_precision)
    with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None and device.type == "cuda"):  # as infer.py
        write_submission(task, model, folder / "test", submission, batch_size=cfg.trainer.eval_batch_size or cfg.trainer.batch_size,
                         num_workers=0, device=device)

    # Score the CSV itself (odd columns, 0.1 m/s, clipped), as Kaggle would.
    ids, predicted = read_submission(submission)
    missing = sorted(set(labels) - set(ids))
    if missing or len(ids) != len(labels):
        raise UserError(f"{submission}: {len(ids)} test files, expected the {len(labels)} of {folder / 'test'} "
                        f"(missing e.g. {missing[:3]})")
    families = [labels[i][0] for i in ids]
    truth = np.stack([np.load(labels[i][1])[0] for i in ids]).astype(np.float64)  # (N, 70, 70)
    per_sample = np.abs(predicted - truth[:, :, 1::2]).mean(axis=(1, 2))
    test_mae = float(per_sample.mean())
    per_family = {f: float(per_sample[[g == f for g in families]].mean()) for f in sorted(set(families))}
    baseline = float(np.abs(mean_training_map(folder)[None, :, 1::2] - truth[:, :, 1::2]).mean())

    chosen = [i for f in per_family for i in [j for j, g in zip(ids, families) if g == f][:PICTURE_PER_FAMILY]]
    seismic = torch.from_numpy(np.stack([np.load(folder / "test" / f"{i}.npy") for i in chosen]))
    with torch.no_grad():
        full = task.predict(model, (seismic.to(device),)).float().cpu().numpy()[:, 0]
    picture = draw_predictions(run_dir / "predictions.png", chosen, [labels[i][0] for i in chosen], seismic.numpy(),
                               np.stack([np.load(labels[i][1])[0] for i in chosen]), full)

    curve = val_mae_curve(run_dir)
    lines = [f"test: {len(ids)} simulated samples in the Kaggle layout ({folder / 'test'}), best checkpoint, flip TTA",
             f"  test MAE {test_mae:.2f} m/s (Kaggle's metric, odd columns of submission.csv): "
             + ", ".join(f"{f} {v:.2f}" for f, v in per_family.items()) + f"; always predicting the mean training map: {baseline:.2f}"]
    if curve:
        lines.append(f"  val MAE {curve[0]:.2f} m/s after the first evaluation, {curve[-1]:.2f} after the last, best {min(curve):.2f}")
    lines.append(f"  wrote {submission} and {picture}")
    tqdm.write("\n".join(lines))  # tqdm.write: the training progress bar may still be on the terminal

    if any(tracker.name == "wandb" for tracker in accelerator.trackers):
        run = accelerator.get_tracker("wandb", unwrap=True)
        values = {"test/mae": test_mae, "test/mae_mean_map": baseline, **{f"test/mae_{f}": v for f, v in per_family.items()}}
        run.log({**values, "test/predictions": wandb.Image(str(picture))})
        run.summary.update(values)
    return {"test_mae": round(test_mae, 2), "submission": str(submission), "picture": str(picture)}


def draw_predictions(path: Path, ids: list[str], families: list[str], seismic: np.ndarray, truth: np.ndarray,
                     predicted: np.ndarray) -> Path:
    """One row per sample: two shot gathers ((5, 1000, 70) seismic), the true and predicted (70, 70)
    maps on one colour scale, and the signed error."""
    rows = len(ids)
    fig, axes = plt.subplots(rows, 5, figsize=(17, 3.1 * rows), squeeze=False)
    for row in range(rows):
        for column, shot in enumerate(PICTURE_SHOTS):
            gather = seismic[row, shot]
            clip = float(np.percentile(np.abs(gather), 98)) or 1.0  # the direct wave would hide the reflections
            ax = axes[row, column]
            ax.imshow(gather, aspect="auto", cmap="gray", vmin=-clip, vmax=clip, extent=(-0.5, gather.shape[1] - 0.5, gather.shape[0] - 0.5, -0.5))
            ax.set_title(f"{families[row]} {ids[row]}: shot at x={SOURCE_X[shot]}", fontsize=9)
            ax.set_xlabel("receiver")
            ax.set_ylabel("time (ms)")
        # One colour scale for both maps, wide enough for either: a prediction outside the true
        # range must not look right by saturating.
        low, high = min(float(truth[row].min()), float(predicted[row].min())), max(float(truth[row].max()), float(predicted[row].max()))
        error = predicted[row] - truth[row]
        limit = float(np.abs(error).max()) or 1.0
        panels = ((truth[row], "true velocity (m/s)", "jet", low, high),
                  (predicted[row], f"predicted (MAE {np.abs(error).mean():.0f} m/s)", "jet", low, high),
                  (error, "predicted - true (m/s)", "RdBu_r", -limit, limit))
        for ax, (image, title, cmap, vmin, vmax) in zip(axes[row, 2:], panels):
            shown = ax.imshow(image, cmap=cmap, vmin=vmin, vmax=vmax)
            ax.set_title(title, fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
            fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.03)
    fig.subplots_adjust(left=0.05, right=0.97, bottom=0.06, top=0.94, wspace=0.35, hspace=0.45)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return Path(path)
