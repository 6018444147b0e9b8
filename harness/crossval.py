"""k-fold cross-validation runs: `train.py CONFIG data.fold=all` trains every fold of `data.folds` in
turn into `<output_dir>/fold_<k>`, then writes the out-of-fold predictions and the CV score there.

- Each fold is an ordinary run of the config with `data.fold=k` (its own lock, checkpoints, metrics,
  W&B run named `<name>-fold_<k>` in the group `<output_dir's name>`): infer.py, `harness.runs` and
  a resume treat it as any run.
- Resumable: a fold whose `last` checkpoint says it finished, under this same config, is skipped;
  an interrupted fold resumes (resume=auto); a fold stopped by SIGTERM or trainer.max_minutes stops
  the folds run (the same command continues it). A second folds run on the same output_dir is
  refused by the folder's lock, as a second run of any kind is.
- Then each fold's best checkpoint predicts its validation part (harness.loop.evaluate, on every
  process): `oof.npy` (the task's `predictions` of every training sample, in `Task.fold_samples`
  order; NaN for a sample no fold held out), `oof.csv` (id, fold, stratum, the per-sample metrics,
  the task's prediction columns) and `cv.json` (the monitored metric of each fold's best checkpoint
  and its mean, std (ddof=0), min and max over folds; the pooled out-of-fold metrics; the same per
  stratum: class or family).
"""
from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

import numpy as np
from accelerate.utils import broadcast_object_list
from torch.utils.data import DataLoader

from harness import checkpoint as ckpt
from harness import loop
from harness.errors import ConfigError, UserError
from harness.files import TEMPORARY_SUFFIX, write_text_atomic
from harness.folds import CV_FILE, FOLD_DIR, FOLD_DIR_PATTERN, NEVER_HELD_OUT, OOF_CSV, OOF_NPY, assign_folds
from harness.inference import load_ensemble
from harness.rundir import RunLock, check_output_dir
from harness.task import FoldKeys, get_task


def train(cfg) -> dict:
    """train.py's command: the k-fold run for `data.fold=all`, else one run (`harness.loop.train`)."""
    data = getattr(cfg, "data", None)
    if isinstance(data, FoldKeys) and data.fold == "all":
        return train_folds(cfg)
    return loop.train(cfg)


def fold_config(cfg, fold: int):
    """The config of fold `fold` of the k-fold run `cfg`: its own output_dir, W&B name and group."""
    root = Path(cfg.output_dir)
    sub = cfg.model_copy(deep=True)
    sub.data.fold = fold
    sub.output_dir = str(root / FOLD_DIR.format(fold))
    sub.log.name = f"{cfg.log.name or root.name}-{FOLD_DIR.format(fold)}"
    sub.log.group = cfg.log.group or root.name
    return sub


def is_finished(sub) -> bool:
    """The fold's run finished under exactly this config (read only: a damaged `last` is not finished,
    and the fold's own resume deals with it)."""
    last = Path(sub.output_dir) / "checkpoints" / "last"
    if not ckpt.is_complete(last):
        return False
    meta = ckpt.read_meta(last)
    return meta.get("reason") == "finished" and meta.get("config") == sub.model_dump(mode="json")


def train_folds(cfg) -> dict:
    """Train every fold not yet finished, then write oof.npy, oof.csv and cv.json; returns a summary."""
    folds = cfg.data.folds
    if cfg.resume not in ("auto", "never"):
        raise ConfigError(f"key 'resume': {cfg.resume!r} names one checkpoint; data.fold=all resumes each fold from its "
                          "own fold_<k> (resume=auto) or starts them all over (resume=never)")
    if cfg.checkpoint.keep_top_k < 1:
        raise ConfigError("key 'checkpoint.keep_top_k': data.fold=all predicts each fold's part with its best "
                          "checkpoint; keep at least 1")
    root = Path(cfg.output_dir)
    # The launch's processes as every fold's run sees them (the folds' own Accelerators share its state).
    accelerator = loop.make_accelerator(cfg)
    lock = _lock_folds_folder(accelerator, root, folds)
    summary: dict = {"folds": folds, "trained": [], "skipped": []}
    try:
        for fold in range(folds):
            sub = fold_config(cfg, fold)
            if cfg.resume == "auto" and main_process_says(accelerator, is_finished(sub)):  # all skip, or all train
                summary["skipped"].append(fold)
                accelerator.print(f"fold {fold}: finished already ({sub.output_dir}), skipped")
                continue
            accelerator.print(f"fold {fold} of {folds}: training into {sub.output_dir}")
            result = loop.train(sub, more_runs_follow=True)
            summary["trained"].append(fold)
            if result.get("stopped") != "finished":
                return {**summary, "stopped": result.get("stopped"), "fold": fold}
        cv = out_of_fold(cfg, root, accelerator)
        accelerator.end_training()
        summary["stopped"] = "finished"
        summary[cfg.checkpoint.monitor] = {key: cv[key] for key in ("mean", "std")}
        summary["cv"] = str(root / CV_FILE)
        return summary
    finally:
        if lock is not None:
            lock.release()


def main_process_says(accelerator, value):
    """The main process's `value` on every process (no communication with one process)."""
    if accelerator.num_processes == 1:
        return value
    box = [value]
    broadcast_object_list(box)
    return box[0]


def _lock_folds_folder(accelerator, root: Path, folds: int) -> RunLock | None:
    """Check and lock the folds run's folder (main process; every process stops if it fails): a
    second folds run on it is refused, and a folder holding a single run or more folds than
    data.folds (an earlier run of another data.folds) is no place for this one."""
    verdict, lock = [None], None
    if accelerator.is_main_process:
        try:
            check_output_dir(str(root))
            if (root / "checkpoints").exists():
                raise ConfigError(f"key 'output_dir': {str(root)!r} holds a single run (checkpoints/); a k-fold run "
                                  "writes fold_<k> folders: give it a folder of its own")
            extra = sorted(p.name for p in root.iterdir() if (m := FOLD_DIR_PATTERN.match(p.name)) and int(m.group(1)) >= folds)
            if extra:
                raise ConfigError(f"key 'data.folds': {str(root)!r} holds {', '.join(extra)} of a run with more folds "
                                  f"than {folds}; choose another output_dir (or move them away)")
            lock = RunLock(root)
            lock.acquire()
        except UserError as err:
            verdict[0] = ("config" if isinstance(err, ConfigError) else "user", str(err))
    verdict[0] = main_process_says(accelerator, verdict[0])  # every process stops, or none
    if verdict[0] is not None:
        kind, message = verdict[0]
        raise (ConfigError if kind == "config" else UserError)(message)
    return lock


def out_of_fold(cfg, root: Path, accelerator) -> dict:
    """Predict each fold's validation part with its best checkpoint; write oof.npy, oof.csv and cv.json
    (main process); returns the CV summary (cv.json's content)."""
    folds, seed = cfg.data.folds, cfg.data.split_seed
    task = get_task(cfg.task, fold_config(cfg, 0))
    samples = task.fold_samples(fold_config(cfg, 0))
    assignment = assign_folds(samples.strata, samples.names, folds, seed, samples.groups)
    count = len(samples.ids)
    predictions, metrics, per_fold = None, {}, []
    for fold in range(folds):
        fold_dir = root / FOLD_DIR.format(fold)
        best = ckpt.read_meta(ckpt.resolve(fold_dir))
        fold_task, fold_cfg, model = load_ensemble([str(fold_dir)])
        _, val_set = fold_task.build_datasets(fold_cfg)
        index = np.flatnonzero(assignment == fold)
        if len(val_set) != len(index):
            raise RuntimeError(f"task {task.name!r}: fold {fold} validates on {len(val_set)} samples, its fold_samples "
                               f"assign {len(index)} (Task.fold_samples and build_datasets disagree)")
        loader = DataLoader(val_set, batch_size=cfg.trainer.eval_batch_size or cfg.trainer.batch_size,
                            collate_fn=fold_task.collate_fn)
        model, loader = accelerator.prepare(model, loader)
        kept: dict = {}
        loop.evaluate(accelerator, fold_task, model, loader, cfg.trainer.channels_last, per_sample=kept)
        predicted = kept.pop("predictions").numpy()
        if predictions is None:
            predictions = np.full((count, *predicted.shape[1:]), np.nan, dtype=np.float32)
        predictions[index] = predicted
        for name, values in kept.items():
            metrics.setdefault(name, np.full(count, np.nan))[index] = values.reshape(-1).numpy()
        per_fold.append({"fold": fold, "step": best["step"], "value": best["monitor_value"], "samples": len(index)})
    cv = cv_summary(cfg, samples, assignment, metrics, per_fold)
    if accelerator.is_main_process:
        columns = task.prediction_columns() if predictions.ndim == 2 else None
        write_npy_atomic(root / OOF_NPY, predictions)
        write_text_atomic(root / OOF_CSV, oof_table(samples, assignment, metrics, predictions, columns))
        write_text_atomic(root / CV_FILE, json.dumps(cv, indent=1))
        print(f"cross-validation: {cfg.checkpoint.monitor} {cv['mean']:.5g} +- {cv['std']:.3g} over {folds} folds; "
              f"{root / CV_FILE}, {root / OOF_NPY}, {root / OOF_CSV}", flush=True)
    accelerator.wait_for_everyone()
    return cv


def spread(values) -> dict:
    values = np.asarray([v for v in values if v is not None and np.isfinite(v)], dtype=np.float64)
    if not len(values):
        return {"mean": None, "std": None, "min": None, "max": None}
    return {"mean": float(values.mean()), "std": float(values.std()), "min": float(values.min()), "max": float(values.max())}


def mean_or_none(values: np.ndarray):
    values = values[np.isfinite(values)]
    return float(values.mean()) if len(values) else None


def cv_summary(cfg, samples, assignment: np.ndarray, metrics: dict, per_fold: list[dict]) -> dict:
    """cv.json: the monitor over folds (from each fold's best checkpoint), the pooled out-of-fold
    metrics, and per stratum the monitored metric's pooled value and its spread over folds."""
    monitor = cfg.checkpoint.monitor
    name = monitor.split("/", 1)[1] if monitor.startswith("val/") else None  # val_raw/*: not what `best` holds
    held = assignment != NEVER_HELD_OUT
    cv = {"monitor": monitor, "mode": cfg.checkpoint.mode, "folds": cfg.data.folds,
          **spread([f["value"] for f in per_fold]), "per_fold": per_fold,
          "samples": len(assignment), "held_out": int(held.sum()),
          "oof": {key: mean_or_none(values) for key, values in metrics.items()}}
    if name in metrics:
        by_stratum = {}
        for stratum, stratum_name in enumerate(samples.names):
            mine = np.asarray(samples.strata) == stratum
            fold_values = [mean_or_none(metrics[name][mine & (assignment == fold)])
                           for fold in range(cfg.data.folds) if (mine & (assignment == fold)).any()]
            by_stratum[stratum_name] = {"samples": int((mine & held).sum()), "oof": mean_or_none(metrics[name][mine]),
                                        **spread(fold_values)}
        cv[f"{name}_by_{samples.key}"] = by_stratum
    return cv


def oof_table(samples, assignment: np.ndarray, metrics: dict, predictions: np.ndarray, columns: list[str] | None) -> str:
    """oof.csv: one row per training sample in fold_samples order: id, fold (-1: never held out), its
    stratum, every per-sample metric, and the prediction columns when the task names them."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    names = list(metrics)
    writer.writerow(["id", "fold", samples.key, *names, *(columns or [])])

    def text(value) -> str:
        return f"{value:.6g}" if np.isfinite(value) else ""

    for i, sample_id in enumerate(samples.ids):
        row = [sample_id, int(assignment[i]), samples.names[samples.strata[i]], *(text(metrics[n][i]) for n in names)]
        writer.writerow(row + ([text(v) for v in predictions[i]] if columns else []))
    return out.getvalue()


def write_npy_atomic(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(path.name + TEMPORARY_SUFFIX)
    with open(tmp, "wb") as handle:  # a file object: np.save would append .npy to a bare name
        np.save(handle, array)
    os.replace(tmp, path)
