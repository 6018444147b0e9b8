"""Data for the gwi task: where the samples come from (`data.source`; only "synthetic" so far), how
seismic is prepared for the model (time reduction, then normalisation), and the dataset that serves
(seismic, velocity) pairs with the training-only mirror augmentation.

Every source must go through `prepare_seismic`, test data included, so the model always sees the
same transform it was trained on. Preparation is numpy in, numpy out, as file readers produce.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from gwi import synthetic

RAW_TIME_STEPS = 1000  # samples per trace in OpenFWI (1 s at 1 ms)

# OpenFWI's FlatVel-A amplitude range (its dataset_config.json). The synthetic surrogate is scaled
# to about the same range, so "log_minmax" maps both to roughly [-1, 1].
OPENFWI_DATA_MIN, OPENFWI_DATA_MAX = -26.95, 52.77

# Samples generated at once: bounds the surrogate's working memory (under 100 MB).
_SYNTHETIC_CHUNK = 32


def reduce_time(seismic: np.ndarray, time_steps: int) -> np.ndarray:
    """Resize the time axis of (N, S, T, R) seismic to `time_steps` rows by area averaging (an
    anti-aliased decimation, torch's "area" mode); unchanged when it already has that many."""
    if seismic.shape[2] == time_steps:
        return seismic
    resized = F.interpolate(torch.from_numpy(seismic), size=(time_steps, seismic.shape[3]), mode="area")
    return resized.numpy()


def signed_log(x):
    """sign(x) log(1 + |x|): OpenFWI's log transform, which compresses the strong direct wave
    relative to the weak reflections while keeping the sign."""
    return np.copysign(np.log1p(np.abs(x)), x)


def normalize_seismic(seismic: np.ndarray, method: str) -> np.ndarray:
    """(N, ...) float32 seismic -> normalised float32 copy. "log_minmax": signed log, then OpenFWI's
    fixed amplitude range mapped to [-1, 1]; "standardize": zero mean, unit variance per sample."""
    # numpy, in place on the copy: torch's element-wise ops measured several times slower on 2-core CPUs.
    if method == "log_minmax":
        low, high = signed_log(OPENFWI_DATA_MIN), signed_log(OPENFWI_DATA_MAX)
        normalized = signed_log(seismic)
        normalized -= low
        normalized *= 2 / (high - low)
        normalized -= 1
        return normalized
    if method == "standardize":
        axes = tuple(range(1, seismic.ndim))
        normalized = seismic - seismic.mean(axis=axes, keepdims=True)
        normalized /= normalized.std(axis=axes, keepdims=True) + 1e-6
        return normalized
    raise ValueError(f"unknown seismic normalisation {method!r}; known: log_minmax, standardize")


def prepare_seismic(raw: np.ndarray, time_steps: int, normalize: str) -> np.ndarray:
    """Raw seismic (N, 5, 1000, 70) -> float32 model input (N, 5, time_steps, 70)."""
    seismic = np.ascontiguousarray(raw, dtype=np.float32)
    return normalize_seismic(reduce_time(seismic, time_steps), normalize).astype(np.float32, copy=False)


def synthetic_samples(num: int, seed: list[int], time_steps: int, normalize: str) -> tuple[torch.Tensor, torch.Tensor]:
    """`num` layered velocity maps and their prepared surrogate seismic, from `seed`:
    (seismic (num, 5, time_steps, 70), velocity (num, 1, 70, 70)), both float32."""
    rng = np.random.default_rng(seed)
    velocity = synthetic.layered_velocity(num, rng)
    seismic = np.empty((num, len(synthetic.SOURCE_X), time_steps, synthetic.GRID_SIZE), dtype=np.float32)
    for start in range(0, num, _SYNTHETIC_CHUNK):
        chunk = slice(start, start + _SYNTHETIC_CHUNK)
        raw = synthetic.reflection_seismic(velocity[chunk], nt=RAW_TIME_STEPS)
        seismic[chunk] = prepare_seismic(raw, time_steps, normalize)
    return torch.from_numpy(seismic), torch.from_numpy(velocity)


def load_split(data, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(seismic, velocity) of a split ("train" or "val") as `data` (a GwiData section) describes."""
    if data.source == "synthetic":
        # Different seeds per split, so validation maps are never training maps.
        split_id = {"train": 0, "val": 1}[split]
        num = data.num_train if split == "train" else data.num_val
        return synthetic_samples(num, [data.synth_seed, split_id], data.time_steps, data.normalize)
    raise ValueError(f"unknown gwi data source {data.source!r}; known: synthetic")


def mirror(seismic: torch.Tensor, velocity: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mirror one sample left-right: the velocity map's columns, the receivers, and the source
    order. Source i's mirror is source 4 - i: exactly for the outer four (0 <-> 69, 17 <-> 52);
    the middle source at x = 34 mirrors to x = 35, one cell off, as in OpenFWI's geometry."""
    return seismic.flip(dims=(0, 2)), velocity.flip(dims=(2,))


def flip_decision(seed: int, epoch: int, index: int) -> bool:
    """Whether sample `index` is mirrored in `epoch`: a coin toss that depends only on
    (seed, epoch, index), so a resumed run sees exactly the same augmentation."""
    return bool(np.random.default_rng([seed % 2**64, epoch, index]).random() < 0.5)


class GwiDataset(Dataset):
    """(seismic, velocity) pairs held in memory. With `flip`, each sample is mirrored or not
    according to `flip_decision(seed, epoch, index)`; the loop sets the epoch via `set_epoch`."""

    def __init__(self, seismic: torch.Tensor, velocity: torch.Tensor, flip: bool = False, seed: int = 0):
        if len(seismic) != len(velocity):
            raise ValueError(f"{len(seismic)} seismic samples but {len(velocity)} velocity maps")
        self.seismic, self.velocity = seismic, velocity
        self.flip, self.seed, self.epoch = flip, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.seismic)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        seismic, velocity = self.seismic[index], self.velocity[index]
        if self.flip and flip_decision(self.seed, self.epoch, index):
            seismic, velocity = mirror(seismic, velocity)
        return seismic, velocity
