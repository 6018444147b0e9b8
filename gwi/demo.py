"""The built-in demo (configs/default.yaml, `make demo`): simulated data made on first use, and a
report on a simulated test set after training.

`data.source: simulated` draws velocity maps of OpenFWI-like families (`gwi.physics.velocity`) and
simulates their seismic with the OpenFWI-exact forward model (`gwi.physics.forward_model`), once,
into a folder of `data.cache_dir` named after what it holds:

    <data.cache_dir>/FlatVel_A+CurveVel_A_train352_val64_test48_seed0/
        spec.json                        what the folder holds, checked on every use
        train/<Family>/data/dataK.npy    OpenFWI layout: (n, 5, 1000, 70) float16 seismic
        train/<Family>/model/modelK.npy                  (n, 1, 70, 70) float32 velocity, 500 a file
        val/<Family>/...                 the same for the validation maps
        test/<id>.npy                    Kaggle test layout: one (5, 1000, 70) float32 file per sample
        test_labels/<Family>/<id>.npy    its true (1, 70, 70) map, kept aside for scoring

Family F's maps form one stream, map j drawn exactly as `python -m gwi.physics.synth --family F
--seed S` draws it (`shard_velocity`): train takes the first ones, val the next, test the next, so
no map is in two splits, and train/F is what that command writes with --float16. Samples are split
evenly over the families. Training seismic is float16 (half the disk: float32 would be 1.4 MB a
sample; the reader and the models take float16 as it is); test files are float32, as Kaggle ships
them. Generation is deterministic (the CPU simulator gives the same bits whatever the batch),
resumable (a piece whose files are all present is skipped; every file is written under a temporary
name and renamed) and skipped altogether once complete. Only the local main process simulates;
the other processes wait for it, then read.

After training (`report`, called from `GwiTask.after_training`, main process): the run's best
checkpoint predicts test/ with flip TTA into `<run_dir>/submission.csv` through the validated Kaggle
writer; that CSV is scored against the true maps with the Kaggle metric (MAE over the odd columns),
overall and per family, next to the MAE of always predicting the mean training map; and
`<run_dir>/predictions.png` shows a few test samples: two shots, true map, predicted map, error.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate.state import PartialState
from tqdm.auto import tqdm

from gwi.layout import SEISMIC_SAMPLE_SHAPE, VELOCITY_SAMPLE_SHAPE, find_pairs
from gwi.physics.acoustic import DEFAULTS, OPENFWI_SOURCES, forward_model
from gwi.physics.synth import PER_FILE, Shard, save_atomic, shard_velocity
from harness.errors import UserError

SPLITS = ("train", "val", "test")
SPEC_FILE = "spec.json"
SIMULATION_BATCH = 8  # maps simulated together: the CPU simulator's sweet spot (bench/forward.py uses 8)
TRAIN_SEISMIC_DTYPE = np.dtype("float16")
TEST_SEISMIC_DTYPE = np.dtype("float32")
VELOCITY_DTYPE = np.dtype("float32")
PICTURE_SHOTS = (0, 2)  # the first source (x = 0) and the middle one (x = 34)
PICTURE_PER_FAMILY = 2


# ---- the simulated data set --------------------------------------------------------------------------


@dataclass(frozen=True)
class Piece:
    """Samples simulated and written together: one shard of one family in one split."""

    split: str  # "train", "val" or "test"
    family: str
    shard: Shard  # index K (dataK.npy), sample count, first map in the family's stream


def cache_folder(data) -> Path:
    """The folder that holds (or will hold) the data `data` (a GwiData section) describes: its name
    says everything that changes the data, so another size or seed goes to another folder."""
    name = (f"{'+'.join(data.families)}_train{data.num_train}_val{data.num_val}_test{data.num_test}"
            f"_seed{data.synth_seed}")
    return Path(data.cache_dir).expanduser() / name


def spec(data) -> dict:
    """What a cache folder holds, as written to its spec.json: the folder name's settings plus the
    format ones (a later change of the format must not reuse an old folder)."""
    return {"families": list(data.families), "num_train": data.num_train, "num_val": data.num_val,
            "num_test": data.num_test, "seed": data.synth_seed, "per_file": PER_FILE,
            "train_seismic_dtype": str(TRAIN_SEISMIC_DTYPE), "test_seismic_dtype": str(TEST_SEISMIC_DTYPE),
            "simulator": "gwi.physics.forward_model with OpenFWI's defaults", "skip_steps": DEFAULTS["skip_steps"],
            "format": 1}


def split_evenly(total: int, families: list[str]) -> list[int]:
    """`total` samples over the families: equal shares, the first families one more when it does not divide."""
    share, extra = divmod(total, len(families))
    return [share + (index < extra) for index in range(len(families))]


def plan(data) -> list[Piece]:
    """Every piece of the data set, in generation order (family by family: train, val, test)."""
    counts = {split: split_evenly(getattr(data, f"num_{split}"), data.families) for split in SPLITS}
    pieces = []
    for index, family in enumerate(data.families):
        start = 0  # position in the family's stream of maps
        for split in SPLITS:
            count = counts[split][index]
            for number, offset in enumerate(range(0, count, PER_FILE)):
                pieces.append(Piece(split, family, Shard(number + 1, min(PER_FILE, count - offset), start + offset)))
            start += count
    return pieces


def sample_id(family: str, seed: int, position: int) -> str:
    """An opaque, stable id of a test sample (10 hex digits, like Kaggle's), so file names say
    nothing about the family."""
    return hashlib.sha1(f"{family}/{seed}/{position}".encode()).hexdigest()[:10]


def piece_files(folder: Path, piece: Piece, seed: int) -> list[tuple[Path, tuple, np.dtype]]:
    """(path, shape, dtype) of every file a piece writes, in writing order."""
    count = piece.shard.count
    if piece.split == "test":
        ids = [sample_id(piece.family, seed, position) for position in range(piece.shard.start, piece.shard.start + count)]
        # The labels go last: a test piece is complete once its last label is there.
        return ([(folder / "test" / f"{i}.npy", SEISMIC_SAMPLE_SHAPE, TEST_SEISMIC_DTYPE) for i in ids]
                + [(folder / "test_labels" / piece.family / f"{i}.npy", VELOCITY_SAMPLE_SHAPE, VELOCITY_DTYPE) for i in ids])
    root = folder / piece.split / piece.family
    return [(root / "data" / f"data{piece.shard.index}.npy", (count, *SEISMIC_SAMPLE_SHAPE), TRAIN_SEISMIC_DTYPE),
            (root / "model" / f"model{piece.shard.index}.npy", (count, *VELOCITY_SAMPLE_SHAPE), VELOCITY_DTYPE)]


def is_written(folder: Path, piece: Piece, seed: int) -> bool:
    """Whether all the piece's files are there (headers only: milliseconds). A file with another
    shape or dtype was not written by this code for this folder: an error, never overwritten."""
    for path, shape, dtype in piece_files(folder, piece, seed):
        if not path.is_file():
            return False
        try:
            array = np.load(path, mmap_mode="r")
        except (ValueError, OSError, EOFError):
            return False  # unreadable (damaged): simulate the piece again
        if array.shape != shape or array.dtype != dtype:
            raise UserError(f"{path}: shape {array.shape} {array.dtype}, expected {shape} {dtype}; the folder "
                            f"{folder} holds other data than data.* describes: remove it and run again")
    return True


def _check_spec(folder: Path, expected: dict) -> None:
    path = folder / SPEC_FILE
    if not path.is_file():
        return
    found = json.loads(path.read_text())
    if found != expected:
        changed = sorted(key for key in expected.keys() | found.keys() if found.get(key) != expected.get(key))
        raise UserError(f"{path} describes other data than data.* asks for (differs in {', '.join(changed)}); "
                        f"remove {folder} to simulate it again, or set another data.cache_dir")


def simulate(data) -> list[Piece]:
    """Simulate and write the pieces of `data`'s folder that are not written yet; returns them."""
    folder = cache_folder(data)
    expected = spec(data)
    _check_spec(folder, expected)
    pieces = plan(data)
    todo = [p for p in pieces if not is_written(folder, p, data.synth_seed)]
    if not todo:
        return []
    if not (folder / SPEC_FILE).is_file():  # first: a half-made folder already says what it is for
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{SPEC_FILE}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(expected, indent=1))
        os.replace(tmp, folder / SPEC_FILE)
    total = sum(p.shard.count for p in todo)
    print(f"simulated data: simulating {total} of {sum(p.shard.count for p in pieces)} samples "
          f"({', '.join(data.families)}) into {folder}; done once, then read from there", file=sys.stderr, flush=True)
    with tqdm(total=total, unit="sample", desc="simulate", file=sys.stderr) as bar:
        for piece in todo:
            # On the CPU whatever the run's device: the CPU simulator gives the same bits for any
            # batch, so the cache is the same on every machine.
            velocity = shard_velocity(piece.family, data.synth_seed, piece.shard)
            seismic = np.empty((len(velocity), *SEISMIC_SAMPLE_SHAPE), np.float32)
            for start in range(0, len(velocity), SIMULATION_BATCH):
                seismic[start:start + SIMULATION_BATCH] = forward_model(velocity[start:start + SIMULATION_BATCH])
                bar.update(len(velocity[start:start + SIMULATION_BATCH]))
            files = piece_files(folder, piece, data.synth_seed)
            if piece.split == "test":
                arrays = [*seismic.astype(TEST_SEISMIC_DTYPE), *velocity]
            else:
                arrays = [seismic.astype(TRAIN_SEISMIC_DTYPE), velocity]
            for (path, _, _), array in zip(files, arrays):
                save_atomic(path, array)
    return todo


def simulated_data(data) -> Path:
    """The folder of `data`'s simulated data, simulating what is missing first. The local main
    process of each machine goes first and simulates; the others then only check that it is all
    there (a folder shared between machines works too: same bits, atomic renames)."""
    state = PartialState()
    folder = cache_folder(data)
    with state.local_main_process_first():
        if state.is_local_main_process:
            simulate(data)
        else:
            _check_spec(folder, spec(data))
            missing = [p for p in plan(data) if not is_written(folder, p, data.synth_seed)]
            if missing:
                raise UserError(f"{folder}: the main process did not finish simulating ({len(missing)} pieces missing, "
                                f"e.g. {missing[0].split}/{missing[0].family}); run again")
    return folder


def label_files(folder: Path) -> dict[str, tuple[str, Path]]:
    """id -> (family, path of its true map) for every sample of the folder's test set."""
    labels = {path.stem: (path.parent.name, path) for path in sorted((folder / "test_labels").glob("*/*.npy"))}
    if not labels:
        raise UserError(f"{folder / 'test_labels'}: no true maps of the test set there")
    return labels


# ---- the report after training -----------------------------------------------------------------------


def read_submission(path: Path) -> tuple[list[str], np.ndarray]:
    """A submission CSV -> (file ids in order, velocity (N, 70, 35) of the odd columns)."""
    lines = Path(path).read_text().splitlines()[1:]
    if not lines or len(lines) % 70:
        raise UserError(f"{path}: {len(lines)} rows, expected a multiple of 70")
    ids = [line.split(",", 1)[0].rsplit("_y_", 1)[0] for line in lines[::70]]
    values = np.array([line.split(",")[1:] for line in lines], dtype=np.float64)
    return ids, values.reshape(len(ids), 70, -1)


def val_mae_curve(run_dir: Path) -> list[float]:
    """val/mae at every evaluation of the run, from its metrics.jsonl."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [row["val/mae"] for row in rows if "val/mae" in row]


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
    # Imported here: gwi.submission imports gwi.data, which imports this module.
    from gwi.submission import write_submission
    from harness.inference import load_ensemble

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
        import wandb

        run = accelerator.get_tracker("wandb", unwrap=True)
        values = {"test/mae": test_mae, "test/mae_mean_map": baseline, **{f"test/mae_{f}": v for f, v in per_family.items()}}
        run.log({**values, "test/predictions": wandb.Image(str(picture))})
        run.summary.update(values)
    return {"test_mae": round(test_mae, 2), "submission": str(submission), "picture": str(picture)}


def draw_predictions(path: Path, ids: list[str], families: list[str], seismic: np.ndarray, truth: np.ndarray,
                     predicted: np.ndarray) -> Path:
    """One row per sample: two shot gathers ((5, 1000, 70) seismic), the true and predicted (70, 70)
    maps on one colour scale, and the signed error."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on rented machines
    import matplotlib.pyplot as plt

    rows = len(ids)
    fig, axes = plt.subplots(rows, 5, figsize=(17, 3.1 * rows), squeeze=False)
    for row in range(rows):
        for column, shot in enumerate(PICTURE_SHOTS):
            gather = seismic[row, shot]
            clip = float(np.percentile(np.abs(gather), 98)) or 1.0  # the direct wave would hide the reflections
            ax = axes[row, column]
            ax.imshow(gather, aspect="auto", cmap="gray", vmin=-clip, vmax=clip, extent=(-0.5, 69.5, 999.5, -0.5))
            ax.set_title(f"{families[row]} {ids[row]}: shot at x={OPENFWI_SOURCES[shot][0]}", fontsize=9)
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
