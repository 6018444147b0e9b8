"""Predictions for folders of seismic: the Kaggle submission CSV for a test folder, or MAE (overall,
odd columns, per family) and out-of-fold predictions for a labelled folder in the training layout.

The submission has one row per test file and depth row, `oid_ypos = <id>_y_<row>` for rows 0..69,
and the odd columns x_1, x_3, ..., x_69: 65,818 files make 4.6 million rows and 161 million values,
so values are formatted by numpy in bulk (fixed width, 0.1 m/s: far below any error that matters)
and only ids are joined per row. The CSV is written to a temporary file, validated (header, row
count, ids, field counts, finite values), and only then renamed into place.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from gwi.data import SeismicPairs
from gwi.layout import SEISMIC_SAMPLE_SHAPE, find_pairs
from harness.config import UserError

ODD_COLUMNS = tuple(range(1, 70, 2))
HEADER = "oid_ypos," + ",".join(f"x_{x}" for x in ODD_COLUMNS) + "\n"
ROWS_PER_FILE = 70
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
        seismic = np.load(path)
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
    odd = np.clip(velocity[:, :, 1::2], 1500.0, 4500.0)
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
                if not (np.isfinite(values).all() and values.min() >= 1500 and values.max() <= 4500):
                    raise UserError(f"{path}: row {count} has values outside [1500, 4500] or non-finite")
    if count != len(ids) * ROWS_PER_FILE:
        raise UserError(f"{path}: {count} rows, expected {len(ids) * ROWS_PER_FILE} ({len(ids)} files x 70)")


@torch.no_grad()
def write_submission(task, model, folder: Path, out: Path, batch_size: int, num_workers: int, device) -> dict:
    dataset = TestFiles(folder)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, pin_memory=device.type == "cuda")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "wb") as handle:
        handle.write(HEADER.encode())
        for seismic, index in tqdm(loader, desc="predict", unit="batch", total=len(loader)):
            velocity = task.predict(model, (seismic.to(device, non_blocking=True),))
            handle.write(format_rows([dataset.ids[i] for i in index.tolist()], velocity[:, 0].cpu().numpy()))
    validate_submission(tmp, dataset.ids)
    os.replace(tmp, out)
    return {"files": len(dataset), "rows": len(dataset) * ROWS_PER_FILE, "submission": str(out)}


@torch.no_grad()
def evaluate_folder(task, model, folder: Path, batch_size: int, num_workers: int, device,
                    save_predictions: Path | None = None) -> dict:
    """MAE (all columns, odd columns, per family) on a labelled folder in the training layout;
    optionally the predictions as a (N, 1, 70, 70) float32 .npy in dataset order (out-of-fold)."""
    pairs = find_pairs([folder])
    families = sorted({p.family for p in pairs})
    dataset = SeismicPairs(pairs, families)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, pin_memory=device.type == "cuda")
    saved = np.lib.format.open_memmap(save_predictions, mode="w+", dtype=np.float32, shape=(len(dataset), 1, 70, 70)) \
        if save_predictions else None
    sums = {"mae": 0.0, "mae_odd": 0.0, **{f"mae_{f}": 0.0 for f in families}}
    counts = {f: 0 for f in families}
    start = 0
    for seismic, velocity, family in tqdm(loader, desc="evaluate", unit="batch"):
        predicted = task.predict(model, (seismic.to(device),)).cpu()
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
    if saved is not None:
        saved.flush()
    result = {"samples": len(dataset), "mae": sums["mae"] / len(dataset), "mae_odd": sums["mae_odd"] / len(dataset)}
    result |= {f"mae_{f}": sums[f"mae_{f}"] / counts[f] for f in families if counts[f]}
    if save_predictions:
        result["predictions"] = str(save_predictions)
    return result
