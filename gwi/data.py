"""Data for the gwi task: where samples come from (`data.source`: synthetic (gwi/synthetic.py),
simulated (gwi/simulated.py) or files; online draws, alone or mixed in: gwi/online.py), the datasets
that serve them, and the seismic preparation every model input goes through.

Datasets serve *raw* seismic, in the dtype it has on disk (float16 files stay float16 through the
DataLoader: half the bytes), with the training-only mirror augmentation. Preparation (time-axis
reduction, then normalisation) happens on the device, inside the model (`SeismicInput`), so
DataLoader workers only read memory maps, test data gets exactly the training transform, and a
checkpoint carries its own preprocessing.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from gwi import synthetic
from gwi.layout import EXACT_FLIP_SOURCE_X, FIVE_OF_SIX, MAP_SIZE, SOURCE_X, TIME_STEPS, FilePair, find_pairs, split_pairs
from gwi.scaling import scale_decision, scale_map, scaled_record
from gwi.simulated import simulated_data
from harness.errors import ConfigError, UserError
from harness.folds import FoldSamples, fold_indices

SYNTHETIC_FAMILY = "synthetic"  # the family name of every data.source=synthetic sample

# OpenFWI's FlatVel-A amplitude range (its dataset_config.json): "log_minmax" maps it to [-1, 1].
OPENFWI_DATA_MIN, OPENFWI_DATA_MAX = -26.95, 52.77

# Samples generated at once: bounds the surrogate's working memory (about 25 MB per source).
_SYNTHETIC_CHUNK = 32


# ---- preparation (on the device) ---------------------------------------------------------------------


def reduce_time(seismic: torch.Tensor, time_steps: int) -> torch.Tensor:
    """Resize the time axis of (N, S, T, R) seismic to `time_steps` rows by area averaging (an
    anti-aliased decimation); unchanged when it already has that many."""
    if seismic.shape[2] == time_steps:
        return seismic
    return F.interpolate(seismic, size=(time_steps, seismic.shape[3]), mode="area")


def signed_log(x):
    """sign(x) log(1 + |x|): OpenFWI's log transform, which compresses the strong direct wave
    relative to the weak reflections while keeping the sign. Works on tensors and floats."""
    if isinstance(x, torch.Tensor):
        return torch.sign(x) * torch.log1p(x.abs())
    return math.copysign(math.log1p(abs(x)), x)


def normalize_seismic(seismic: torch.Tensor, method: str) -> torch.Tensor:
    """"log_minmax": signed log, then OpenFWI's fixed amplitude range mapped to [-1, 1];
    "standardize": zero mean, unit variance per sample."""
    if method == "log_minmax":
        low, high = signed_log(OPENFWI_DATA_MIN), signed_log(OPENFWI_DATA_MAX)
        return (signed_log(seismic) - low) * (2 / (high - low)) - 1
    if method == "standardize":
        axes = tuple(range(1, seismic.ndim))
        centred = seismic - seismic.mean(dim=axes, keepdim=True)
        return centred / (centred.std(dim=axes, keepdim=True) + 1e-6)
    raise ValueError(f"unknown seismic normalisation {method!r}; known: log_minmax, standardize")


class SeismicInput(nn.Module):
    """Raw seismic (B, 5, T, 70), float16 or float32 -> the model's float32 input (B, 5, time_steps, 70)."""

    def __init__(self, time_steps: int, normalize: str):
        super().__init__()
        self.time_steps, self.normalize = time_steps, normalize

    def forward(self, seismic: torch.Tensor) -> torch.Tensor:
        return normalize_seismic(reduce_time(seismic.float(), self.time_steps), self.normalize)

    def extra_repr(self) -> str:
        return f"time_steps={self.time_steps}, normalize={self.normalize!r}"


# ---- augmentation ----------------------------------------------------------------------------------


def mirror(seismic, velocity):
    """Mirror one sample left-right: the velocity map's columns, the receivers, and the source
    order. Of 5 sources, source i's mirror is source 4 - i: exactly for the outer four (0 <-> 69,
    17 <-> 52); the middle source at x = 34 mirrors to x = 35, one cell off, as in OpenFWI's
    geometry. Of 6 sources (EXACT_FLIP_SOURCE_X: x = 35 added) every one mirrors exactly: the
    result is the 6-source gather of the mirrored map (`openfwi_sources` then takes its 5).
    Works on (5 or 6, T, 70) / (1, 70, 70) tensors or arrays."""
    if isinstance(seismic, torch.Tensor):
        return seismic.flip(dims=(0, 2)), velocity.flip(dims=(2,))
    return seismic[::-1, :, ::-1], velocity[:, :, ::-1]


def openfwi_sources(seismic):
    """The 5 OpenFWI sources of a (6, T, 70) gather with the mirrored middle source (layout's
    FIVE_OF_SIX); a 5-source gather unchanged."""
    return seismic[list(FIVE_OF_SIX)] if seismic.shape[0] == len(EXACT_FLIP_SOURCE_X) else seismic


def flip_decision(seed: int, epoch: int, index: int) -> bool:
    """Whether sample `index` is mirrored in `epoch`: a coin toss that depends only on
    (seed, epoch, index), so a resumed run sees exactly the same augmentation."""
    return bool(np.random.default_rng([seed % 2**64, epoch, index]).random() < 0.5)


# ---- sources ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ArrayPair:
    """Samples held in memory (generated data), with the same interface as a `FilePair`."""

    family: str
    seismic_array: np.ndarray
    velocity_array: np.ndarray

    @property
    def samples(self) -> int:
        return len(self.seismic_array)

    @property
    def name(self) -> str:
        return f"{self.family}/in-memory"

    def open(self) -> tuple[np.ndarray, np.ndarray]:
        return self.seismic_array, self.velocity_array


class SeismicPairs(Dataset):
    """(seismic, velocity, family index) samples over pairs of arrays: memory maps of files, opened
    lazily in each process (so DataLoader workers each map the files themselves and RAM stays
    bounded whatever the data size), or in-memory arrays. Seismic keeps its stored dtype; velocity
    is float32. With `flip`, a sample is mirrored according to `flip_decision(seed, epoch, index)`;
    with `scale` ([lo, hi], data.scale_augment) its map is multiplied by `gwi.scaling.scale_decision`'s
    factor a and its seismic made that map's (`gwi.scaling.scaled_record`, approximate).
    `indices`: serve only these samples of the pairs (in this order), e.g. one k-fold part."""

    def __init__(self, pairs: list, families: list[str], flip: bool = False, seed: int = 0, indices=None,
                 scale: tuple[float, float] | None = None):
        if not pairs:
            raise UserError("no samples: the data selection is empty")
        self.pairs, self.families = pairs, families
        self.offsets = np.cumsum([0] + [p.samples for p in pairs])
        self.indices = None if indices is None else np.asarray(indices, dtype=np.int64)
        self.family_index = [families.index(p.family) for p in pairs]
        self.flip, self.seed, self.epoch, self.scale = flip, seed, 0, scale
        self._opened: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def __getstate__(self):  # memory maps are re-opened in each worker, never pickled
        return {**vars(self), "_opened": {}}

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return int(self.offsets[-1]) if self.indices is None else len(self.indices)

    def locate(self, index: int) -> tuple[int, int]:
        """(pair number, row inside that pair) of a sample index of this dataset."""
        if self.indices is not None:
            index = int(self.indices[index])
        pair = int(np.searchsorted(self.offsets, index, side="right")) - 1
        return pair, index - int(self.offsets[pair])

    def __getitem__(self, index: int):
        pair, row = self.locate(index)
        if pair not in self._opened:
            self._opened[pair] = self.pairs[pair].open()
        seismic_array, velocity_array = self._opened[pair]
        seismic, velocity = np.array(seismic_array[row]), np.array(velocity_array[row], dtype=np.float32)  # reads the row
        for what, array in (("seismic", seismic), ("velocity", velocity)):
            if not np.isfinite(array).all():
                source = getattr(self.pairs[pair], what, self.pairs[pair].name)
                raise UserError(f"{source}: sample {row} contains NaN or inf values")
        if self.flip and flip_decision(self.seed, self.epoch, index):
            seismic, velocity = mirror(seismic, velocity)
        seismic = torch.from_numpy(np.ascontiguousarray(openfwi_sources(seismic)))
        if self.scale is not None:
            a = scale_decision(self.seed, self.epoch, index, self.scale, velocity)
            seismic, velocity = scaled_record(seismic, a), scale_map(velocity, a)
        return seismic, torch.from_numpy(np.ascontiguousarray(velocity)), self.family_index[pair]


def synthetic_samples(num: int, seed: list[int], time_steps: int) -> tuple[np.ndarray, np.ndarray]:
    """`num` layered velocity maps and their raw surrogate seismic, time-reduced to `time_steps`
    (area averaging is linear, so reducing here or on the device gives the same input):
    (seismic (num, 5, time_steps, 70), velocity (num, 1, 70, 70)), both float32."""
    rng = np.random.default_rng(seed)
    velocity = synthetic.layered_velocity(num, rng)
    seismic = np.empty((num, len(SOURCE_X), time_steps, MAP_SIZE), dtype=np.float32)
    for start in range(0, num, _SYNTHETIC_CHUNK):
        chunk = slice(start, start + _SYNTHETIC_CHUNK)
        raw = torch.from_numpy(synthetic.reflection_seismic(velocity[chunk], nt=TIME_STEPS))
        seismic[chunk] = reduce_time(raw, time_steps).numpy()
    return seismic, velocity


def source_pairs(data) -> tuple[list[FilePair], list[FilePair]]:
    """(train, val) file pairs of the `simulated` or `files` source that `data` (a GwiData section)
    describes, validated (shapes, dtypes, velocity range). The files source splits data.roots by
    file (data.fold, part 0 when it is null); the simulated source's val folder is its own."""
    if data.source == "simulated":
        # Simulated once into data.cache_dir (the OpenFWI layout), then read like any files.
        folder = simulated_data(data)
        return find_pairs([folder / "train"]), find_pairs([folder / "val"])
    if data.source != "files":
        raise ValueError(f"data source {data.source!r} has no files; known file sources: simulated, files")
    if not data.roots:
        raise UserError("key 'data.roots': data.source=files needs at least one folder of training data")
    if data.val_roots:
        if data.fold is not None:
            raise ConfigError("key 'data.fold': k-fold validates on a part of data.roots, data.val_roots on other "
                              "folders; set one of them")
        return find_pairs(data.roots), find_pairs(data.val_roots)
    train, val = split_pairs(find_pairs(data.roots), data.folds, 0 if data.fold is None else data.fold, data.split_seed)
    if not val:
        raise UserError(f"key 'data.folds': no family under {', '.join(data.roots)} has two files, so nothing "
                        "is left to validate on; add files or set data.val_roots")
    return train, val


def family_names(pairs: list) -> list[str]:
    """The families of `pairs`, sorted: a sample's family index counts in this list."""
    return sorted({p.family for p in pairs})


def dataset_families(data) -> list[str]:
    """The family list of the datasets `build_datasets(data, ...)` builds, without building them
    (for the simulated source the cache is made first if it is missing, as training would)."""
    if data.source == "synthetic":
        return [SYNTHETIC_FAMILY]
    if data.fold is not None and data.source == "simulated":
        return family_names(find_pairs([simulated_data(data) / "train"]))
    train, val = source_pairs(data)
    return family_names(train + val)


def fold_samples(data) -> FoldSamples:
    """The training set k-fold splits (data.fold), by family: the synthetic source's num_train samples,
    the simulated source's training files sample by sample, the files source's data.roots file by
    file (a file's samples stay in one fold). Ids are "<family>/<file stem>:<row>"."""
    if data.source == "synthetic":
        pairs = [_SyntheticPlaceholder(data.num_train)]  # ids and families only: nothing generated
    elif data.source == "simulated":
        pairs = find_pairs([simulated_data(data) / "train"])
    elif data.source == "files":
        if not data.roots:
            raise UserError("key 'data.roots': data.source=files needs at least one folder of training data")
        pairs = find_pairs(data.roots)
    else:
        raise ValueError(f"unknown gwi data source {data.source!r}; known: synthetic, simulated, files")
    families = family_names(pairs)
    return FoldSamples(
        strata=np.repeat([families.index(p.family) for p in pairs], [p.samples for p in pairs]),
        names=families, ids=[f"{p.name}:{row}" for p in pairs for row in range(p.samples)], key="family",
        groups=np.repeat(np.arange(len(pairs)), [p.samples for p in pairs]) if data.source == "files" else None)


@dataclass(frozen=True)
class _SyntheticPlaceholder:
    """The synthetic training set's family and size, as fold_samples needs them, without its arrays."""

    samples: int
    family: str = SYNTHETIC_FAMILY
    name = ArrayPair.name  # the same property: ids name the samples as the built pairs do


def build_datasets(data, seed: int) -> tuple[SeismicPairs, SeismicPairs]:
    """(train, val) as `data` (a GwiData section) describes; `seed` drives the flip augmentation.
    With data.fold (synthetic, simulated): both are parts of the training set (`fold_samples`)."""
    if data.source == "synthetic":
        # Different seeds per split, so validation maps are never training maps.
        train = [ArrayPair(SYNTHETIC_FAMILY, *synthetic_samples(data.num_train, [data.synth_seed, 0], data.time_steps))]
        val = [] if data.fold is not None else \
            [ArrayPair(SYNTHETIC_FAMILY, *synthetic_samples(data.num_val, [data.synth_seed, 1], data.time_steps))]
    elif data.source == "simulated" and data.fold is not None:
        train, val = find_pairs([simulated_data(data) / "train"]), []
    elif data.source in ("simulated", "files"):
        train, val = source_pairs(data)  # the files source splits by file itself
    else:
        raise ValueError(f"unknown gwi data source {data.source!r}; known: synthetic, simulated, files")
    families = family_names(train + val)
    if data.fold is None or data.source == "files":
        return SeismicPairs(train, families, flip=data.flip, seed=seed, scale=data.scale_augment), SeismicPairs(val, families)
    train_index, val_index = fold_indices(fold_samples(data), data.folds, data.fold, data.split_seed)
    return (SeismicPairs(train, families, flip=data.flip, seed=seed, indices=train_index, scale=data.scale_augment),
            SeismicPairs(train, families, indices=val_index))
