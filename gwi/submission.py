"""Predictions for folders of seismic: the Kaggle submission CSV for a test folder, or MAE (overall,
odd columns, per family) and out-of-fold predictions for a labelled folder in the training layout.

The submission has one row per test file and depth row, `oid_ypos = <id>_y_<row>` for rows 0..69,
and the odd columns x_1, x_3, ..., x_69: 65,818 files make 4.6 million rows and 161 million values,
so values are formatted by numpy in bulk (fixed width, 0.1 m/s: far below any error that matters)
and only ids are joined per row. The CSV is written to a temporary file, validated (header, row
count, ids, field counts, finite values), and only then renamed into place; `read_submission` reads
one back (the demo's report scores its own CSV).

Physics (infer.py --physics-misfit / --refine-steps; `PhysicsOptions`, gwi/physics/fwi.py): the
predicted maps are re-simulated and compared with each file's seismic (the normalised misfit), and
optionally refined by full-waveform inversion before they are written or scored. Means go into the
result, per-sample values into a CSV.
"""
from __future__ import annotations

import contextlib
import csv
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from gwi.data import SeismicPairs
from gwi.layout import MAP_SIZE, SEISMIC_SAMPLE_SHAPE, VELOCITY_MAX, VELOCITY_MIN, VELOCITY_SAMPLE_SHAPE, find_pairs, npy_writer
from gwi.physics.fwi import DEFAULT_LR, refine, seismic_misfit
from harness.errors import UserError
from harness.inference import check_output_file

ODD_COLUMNS = tuple(range(1, MAP_SIZE, 2))
HEADER = "oid_ypos," + ",".join(f"x_{x}" for x in ODD_COLUMNS) + "\n"
ROWS_PER_FILE = MAP_SIZE  # one row per depth cell of the map
VALUE_WIDTH = 7  # ",dddd.d": velocities are clipped to [1500, 4500], always four integer digits


class TestFiles(Dataset):
    """The Kaggle test layout: `<id>.npy` files of (5, 1000, 70) float32, in sorted id order."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.paths = sorted(self.folder.glob("*.npy"))
        if not self.paths:
            raise UserError(f"--data {self.folder}: no .npy test files there")
        self.ids = [p.stem for p in self.paths]

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        path = self.paths[index]
        try:
            seismic = np.load(path)
        except (ValueError, OSError, EOFError) as err:  # truncated, a text file, a pickle: name the file
            raise UserError(f"{path}: not a readable .npy file ({err})") from None
        if seismic.shape != SEISMIC_SAMPLE_SHAPE:
            raise UserError(f"{path}: shape {seismic.shape}, expected {SEISMIC_SAMPLE_SHAPE}")
        if not np.isfinite(seismic).all():
            raise UserError(f"{path}: contains NaN or inf values")
        return torch.from_numpy(seismic.astype(np.float32, copy=False)), index


def is_test_folder(folder: Path) -> bool:
    """Test files lie directly in the folder; training data lies in family folders."""
    return any(Path(folder).glob("*.npy"))


def format_rows(ids: list[str], velocity: np.ndarray) -> bytes:
    """CSV rows for (B, 70, 70) velocity maps of the files `ids`: numpy writes the digits of all
    values at once; Python only joins one id prefix per row."""
    odd = np.clip(velocity[:, :, 1::2], VELOCITY_MIN, VELOCITY_MAX)
    tenths = np.rint(odd * 10).astype(np.int32)  # 15000..45000
    chars = np.empty(tenths.shape + (VALUE_WIDTH,), np.uint8)
    chars[..., 0] = ord(",")
    for position, power in ((1, 10000), (2, 1000), (3, 100), (4, 10)):
        chars[..., position] = ord("0") + tenths // power % 10
    chars[..., 5] = ord(".")
    chars[..., 6] = ord("0") + tenths % 10
    rows = chars.reshape(len(ids) * ROWS_PER_FILE, len(ODD_COLUMNS) * VALUE_WIDTH)
    rows = np.concatenate([rows, np.full((len(rows), 1), ord("\n"), np.uint8)], axis=1)
    body, width = rows.tobytes(), rows.shape[1]
    prefixes = (f"{file_id}_y_{row}".encode() for file_id in ids for row in range(ROWS_PER_FILE))
    return b"".join(prefix + body[i * width:(i + 1) * width] for i, prefix in enumerate(prefixes))


def validate_submission(path: Path, ids: list[str]) -> None:
    """Raise unless `path` is a complete submission for `ids`: header, one row per (id, depth row)
    in order, 36 fields a row, every value a finite number in [1500, 4500]."""
    expected = (f"{file_id}_y_{row}" for file_id in ids for row in range(ROWS_PER_FILE))
    with open(path, "rb") as handle:
        header = handle.readline().decode()
        if header != HEADER:
            raise UserError(f"{path}: wrong header {header[:60]!r}...")
        count = 0
        for count, line in enumerate(handle, start=1):
            fields = line.rstrip(b"\n").split(b",")
            if len(fields) != 1 + len(ODD_COLUMNS):
                raise UserError(f"{path}: row {count} has {len(fields)} fields, expected {1 + len(ODD_COLUMNS)}")
            if fields[0].decode() != next(expected, None):
                raise UserError(f"{path}: row {count} is {fields[0].decode()!r}, out of order or unexpected")
            if count % ROWS_PER_FILE == 1:  # one full numeric parse per file keeps this fast and still catches garbage
                values = np.array(fields[1:], dtype=np.float64)
                if not (np.isfinite(values).all() and values.min() >= VELOCITY_MIN and values.max() <= VELOCITY_MAX):
                    raise UserError(f"{path}: row {count} has values outside [{VELOCITY_MIN:g}, {VELOCITY_MAX:g}] or non-finite")
    if count != len(ids) * ROWS_PER_FILE:
        raise UserError(f"{path}: {count} rows, expected {len(ids) * ROWS_PER_FILE} ({len(ids)} files x {ROWS_PER_FILE})")


def read_submission(path: Path) -> tuple[list[str], np.ndarray]:
    """A submission CSV -> (file ids in order, velocity (N, 70, 35) of the odd columns), float64."""
    lines = Path(path).read_text().splitlines()[1:]
    if not lines or len(lines) % ROWS_PER_FILE:
        raise UserError(f"{path}: {len(lines)} rows, expected a multiple of {ROWS_PER_FILE}")
    ids = [line.split(",", 1)[0].rsplit("_y_", 1)[0] for line in lines[::ROWS_PER_FILE]]
    values = np.array([line.split(",")[1:] for line in lines], dtype=np.float64)
    return ids, values.reshape(len(ids), ROWS_PER_FILE, -1)


# ---- physics: misfit and refinement -------------------------------------------------------------------


# Maps refined together unless --physics-batch-size says otherwise. The adjoint-state gradient
# keeps ~100 fields of 5 x 310 x 310 per map (~0.2 GB; gwi.physics.adjoint); on a CPU batching
# gains nothing (the threads already share each map's grid). A GPU wants batches.
REFINE_BATCH_CPU, REFINE_BATCH_CUDA = 1, 16


@dataclass(frozen=True)
class PhysicsOptions:
    """infer.py's physics flags. misfit: report the misfit of the maps written / scored; refine_steps:
    FWI steps from the network's maps first (then the misfit before and after is reported);
    refine_tv, refine_lr: the TV weight and Adam's step (gwi/physics/fwi.py); batch_size: maps
    simulated / refined together (default: the prediction batch for the misfit; REFINE_BATCH_CPU /
    _CUDA for refinement); csv: per-sample values."""

    misfit: bool = False
    refine_steps: int = 0
    refine_tv: float = 1.0  # without TV the misfit falls but the MAE rose in every test we ran (gwi/physics/fwi.py)
    refine_lr: float = DEFAULT_LR
    batch_size: int | None = None
    csv: str | None = None

    def __post_init__(self):
        if int(self.refine_steps) != self.refine_steps or self.refine_steps < 0:
            raise UserError(f"--refine-steps must be a non-negative integer, got {self.refine_steps}")
        if not self.refine_tv >= 0:
            raise UserError(f"--refine-tv must be >= 0, got {self.refine_tv}")
        if not self.refine_lr > 0:
            raise UserError(f"--refine-lr must be positive, got {self.refine_lr}")
        if self.batch_size is not None and self.batch_size < 1:
            raise UserError(f"--physics-batch-size must be at least 1, got {self.batch_size}")

    @property
    def enabled(self) -> bool:
        return self.misfit or self.refine_steps > 0


class PhysicsReport:
    """Applies the physics options batch by batch (`apply`), keeps one row per sample, and ends with
    the result's entries (`summary`) and the per-sample CSV."""

    def __init__(self, options: PhysicsOptions, samples: int, device):
        self.options, self.device = options, device
        self.refining = options.refine_steps > 0
        self.refine_batch = REFINE_BATCH_CUDA if torch.device(device).type == "cuda" else REFINE_BATCH_CPU
        self.rows: list[dict] = []
        if options.csv:
            check_output_file("--physics-csv", options.csv)
        # One bar for the whole folder: refinement is the slow part (seconds per map and step on a CPU).
        self.bar = tqdm(total=samples * options.refine_steps, desc="refine", unit="map-step") if self.refining else None

    def apply(self, predicted: torch.Tensor, seismic: torch.Tensor, names: list[str], truth: torch.Tensor | None = None):
        """predicted (B, 1, 70, 70) m/s, seismic (B, 5, 1000, 70), both on the device -> the maps to
        write / score: the refined ones with refine_steps, else `predicted`. truth: a labelled
        folder's maps (CPU), for the MAE before refinement."""
        observed = seismic.float()
        zero = (observed.flatten(1).abs().amax(dim=1) == 0).nonzero().flatten().tolist()
        if zero:
            raise UserError(f"{names[zero[0]]}: the seismic is all zeros, so its physics misfit is undefined")
        batch = self.options.batch_size or len(predicted)
        misfit = network_misfit = seismic_misfit(predicted, observed, batch_size=batch, device=self.device).cpu()
        final = predicted
        if self.refining:
            final = refine(predicted, observed, self.options.refine_steps, tv_weight=self.options.refine_tv,
                           lr=self.options.refine_lr, batch_size=self.options.batch_size or self.refine_batch,
                           device=self.device, progress=self.bar)
            misfit = seismic_misfit(final, observed, batch_size=batch, device=self.device).cpu()
        if truth is not None:
            error, network_error = (final.cpu() - truth).abs(), (predicted.cpu() - truth).abs()
        for i, name in enumerate(names):
            row = {"id": name, "misfit": float(misfit[i])}
            if self.refining:
                row["misfit_before_refine"] = float(network_misfit[i])
            if truth is not None:
                row |= {"mae": float(error[i].mean()), "mae_odd": float(error[i][..., 1::2].mean())}
                if self.refining:
                    row["mae_before_refine"] = float(network_error[i].mean())
                    row["mae_odd_before_refine"] = float(network_error[i][..., 1::2].mean())
            self.rows.append(row)
        return final

    def summary(self) -> dict:
        """Means over the samples, the refinement's settings, and the CSV's path (written here)."""
        if self.bar is not None:
            self.bar.close()
        columns = list(self.rows[0])
        result = {key: float(np.mean([row[key] for row in self.rows])) for key in columns
                  if key in ("misfit", "misfit_before_refine", "mae_before_refine", "mae_odd_before_refine")}
        if self.refining:
            result["refine"] = {"steps": self.options.refine_steps, "tv_weight": self.options.refine_tv,
                                "lr": self.options.refine_lr}
        if self.options.csv:
            path = Path(self.options.csv)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            with open(tmp, "w", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=columns, lineterminator="\n")
                writer.writeheader()
                writer.writerows({k: v if k == "id" else f"{v:.6g}" for k, v in row.items()} for row in self.rows)
            os.replace(tmp, path)
            result["physics_csv"] = str(path)
        return result


def _physics(physics, samples: int, device) -> PhysicsReport | None:
    """A PhysicsReport for `physics` (PhysicsOptions, or a dict of its fields as infer.py passes
    them), or None when no physics was asked for."""
    if isinstance(physics, dict):
        physics = PhysicsOptions(**physics)
    return PhysicsReport(physics, samples, device) if physics is not None and physics.enabled else None


# ---- predicting folders ---------------------------------------------------------------------------------


@torch.no_grad()
def write_submission(task, model, folder: Path, out: Path, batch_size: int, num_workers: int, device,
                     physics: PhysicsOptions | dict | None = None) -> dict:
    dataset = TestFiles(folder)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, pin_memory=device.type == "cuda")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    report = _physics(physics, len(dataset), device)
    with open(tmp, "wb") as handle:
        handle.write(HEADER.encode())
        for seismic, index in tqdm(loader, desc="predict", unit="batch", total=len(loader)):
            seismic = seismic.to(device, non_blocking=True)
            velocity = task.predict(model, (seismic,))
            ids = [dataset.ids[i] for i in index.tolist()]
            if report is not None:
                velocity = report.apply(velocity, seismic, ids)
            handle.write(format_rows(ids, velocity[:, 0].cpu().numpy()))
    validate_submission(tmp, dataset.ids)
    os.replace(tmp, out)
    result = {"files": len(dataset), "rows": len(dataset) * ROWS_PER_FILE, "submission": str(out)}
    if report is not None:
        result |= report.summary()
    return result


@torch.no_grad()
def evaluate_folder(task, model, folder: Path, batch_size: int, num_workers: int, device,
                    save_predictions: Path | None = None, physics: PhysicsOptions | dict | None = None) -> dict:
    """MAE (all columns, odd columns, per family) on a labelled folder in the training layout;
    optionally the predictions as a (N, 1, 70, 70) float32 .npy in dataset order (out-of-fold).
    With refinement (`physics`), the refined maps are the ones scored and saved."""
    pairs = find_pairs([folder])
    families = sorted({p.family for p in pairs})
    dataset = SeismicPairs(pairs, families)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, pin_memory=device.type == "cuda")
    with contextlib.ExitStack() as stack:  # the predictions appear at save_predictions only once complete
        saved = stack.enter_context(npy_writer(save_predictions, np.float32, (len(dataset), *VELOCITY_SAMPLE_SHAPE))) \
            if save_predictions else None
        result = _score_folder(task, model, dataset, loader, device, saved, _physics(physics, len(dataset), device))
    if save_predictions:
        result["predictions"] = str(save_predictions)
    return result


def _score_folder(task, model, dataset: SeismicPairs, loader, device, saved, report) -> dict:
    """evaluate_folder's loop: the MAE sums over the folder, each batch's predictions written into
    `saved` (a (N, 1, 70, 70) array or None), physics applied by `report` (or None)."""
    families = dataset.families
    sums = {"mae": 0.0, "mae_odd": 0.0, **{f"mae_{f}": 0.0 for f in families}}
    counts = {f: 0 for f in families}
    start = 0
    for seismic, velocity, family in tqdm(loader, desc="evaluate", unit="batch"):
        seismic = seismic.to(device)
        predicted = task.predict(model, (seismic,))
        if report is not None:
            names = []
            for index in range(start, start + len(predicted)):  # "<family>/<file stem>:<row>"
                pair, row = dataset.locate(index)
                names.append(f"{dataset.pairs[pair].name}:{row}")
            predicted = report.apply(predicted, seismic, names, truth=velocity)
        predicted = predicted.cpu()
        error = (predicted - velocity).abs().flatten(1)
        sums["mae"] += error.mean(1).sum().item()
        sums["mae_odd"] += (predicted - velocity)[..., 1::2].abs().flatten(1).mean(1).sum().item()
        for index, name in enumerate(families):
            mask = family == index
            sums[f"mae_{name}"] += error[mask].mean(1).sum().item()
            counts[name] += int(mask.sum())
        if saved is not None:
            saved[start:start + len(predicted)] = predicted.numpy()
        start += len(predicted)
    result = {"samples": len(dataset), "mae": sums["mae"] / len(dataset), "mae_odd": sums["mae_odd"] / len(dataset)}
    result |= {f"mae_{f}": sums[f"mae_{f}"] / counts[f] for f in families if counts[f]}
    if report is not None:
        result |= report.summary()
    return result
