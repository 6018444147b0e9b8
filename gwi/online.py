"""Online training data (`data.source=online`, or `data.online_fraction` of file data): every
training sample a fresh velocity draw, turned into seismic by the OpenFWI simulator on the training
device, and the mixing of training sets that makes room for it.

A draw is a velocity map and nothing else. `OnlineDraws` makes sample i of epoch e from one numpy
Generator seeded with (synth_seed, e, i) alone: a family (uniform over the online families), a map
of it (a generator of gwi.physics.velocity, or one of the maps of data.velocity_roots), the
augmentations of data.online_augment, data.flip's mirror and data.scale_augment's factor (the map
times a, exact: it is simulated afterwards). DataLoader workers, the batch size, the number of
processes (each rank gets its own indices from the sampler, so its own draws) and a resume therefore
never change a draw. The task's `prepare_batch` (`OnlineSimulator`) simulates the drawn
maps of each training batch on the training device, without gradients, before the model sees it:
the CPU simulator gives the same bits for a map in any batch, so the same draw always yields the
same seismic, and a run stopped and resumed ends with the weights of a straight run. The flip is
exact: the map is mirrored before it is simulated.

Velocity files (data.velocity_roots: `<Family>/model/model*.npy` or `<Family>/vel*.npy`, (n, 1, 70,
70) m/s, e.g. the real OpenFWI maps): a family found there draws from its maps (in file order map k
validates when k % HELD_OUT_EVERY == HELD_OUT_EVERY - 1 and never trains), the other families of
data.families from the generators. Validation stays a fixed set: data.val_roots' files, or num_val
maps drawn from a separate seed stream (equally many per family, no augmentation) simulated once at
the start of each run (and of a resume: the same bits), in memory.

Training sets: `MixedTrainingSet` holds parts one after another in index order (the loop's seeded
sampler shuffles across them); its samples are (seismic, velocity, family index, online flag), the
seismic None for an online draw (`collate` leaves its rows empty; `OnlineSimulator` fills them). A
part is a stored dataset giving (seismic, velocity, family index), such as `SeismicPairs`, or
`OnlineDraws`, with the share of the epoch `part_counts` gives it. Sets that wrap a training set
(gwi.pseudo's pseudo-labels, gwi.physics_loss's unlabelled files) give their own samples the
wrapped set's format (`sample_format`), so their stored rows stack with its rows in one batch.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from accelerate.state import PartialState
from torch.utils.data import Dataset, default_collate

from gwi.data import ArrayPair, SeismicPairs, family_names, source_pairs
from gwi.layout import MAP_SIZE, TIME_STEPS, VELOCITY_SAMPLE_SHAPE, check_velocity_range, find_pairs
from gwi.physics.acoustic import forward_model
from gwi.physics.velocity import blend, crop_resize, generate, random_affine
from gwi.scaling import scale_factor, scale_map
from harness.errors import ConfigError, UserError

# Seed streams of the draws: training draw i of epoch e is seeded (TRAIN_STREAM, synth_seed, e, i),
# validation map j (VAL_STREAM, synth_seed, j): no training draw repeats a validation one.
TRAIN_STREAM, VAL_STREAM = 1, 2
HELD_OUT_EVERY = 10  # of a velocity family's maps, every 10th validates and never trains
AUGMENT_PROBABILITY = 0.5  # of each augmentation of data.online_augment
NOT_VALIDATED = -1  # the family index of a draw whose family the validation set does not have
VALIDATION_BATCH = {"cpu": 8, "cuda": 64}  # maps simulated together for the validation set


def uses_online(data) -> bool:
    """Whether the data `data` (a GwiData section) describes draws training samples online."""
    return data.source == "online" or data.online_fraction > 0


def check_online(data) -> None:
    """The online keys' combinations that cannot work, as config errors."""
    if data.source == "online" and data.online_fraction > 0:
        raise ConfigError("key 'data.online_fraction': data.source=online draws every training sample online; the "
                          "fraction mixes online draws into data.source=files or simulated")
    if data.source == "synthetic":
        raise ConfigError("key 'data.online_fraction': online draws mix into data.source=files or simulated; the "
                          "synthetic source's surrogate seismic is not what the simulator makes")
    if data.online_nt < data.time_steps:
        raise ConfigError(f"key 'data.online_nt': {data.online_nt} simulated time samples cannot be resized up to "
                          f"data.time_steps={data.time_steps}")
    if data.source != "online" and data.online_nt != TIME_STEPS:
        raise ConfigError(f"key 'data.online_nt': online draws mixed with files must simulate the files' {TIME_STEPS} "
                          f"time samples, got {data.online_nt}")
    if data.online_nt != TIME_STEPS and (data.pseudo_dir or data.unlabelled_roots):
        key = "data.pseudo_dir" if data.pseudo_dir else "data.unlabelled_roots"
        raise ConfigError(f"key 'data.online_nt': online draws mixed with the test files of {key} must simulate their "
                          f"{TIME_STEPS} time samples, got {data.online_nt}")


# ---- where maps come from ----------------------------------------------------------------------------


class GeneratedFamily:
    """A family of gwi.physics.velocity's generators."""

    def __init__(self, name: str):
        self.name = name

    def draw(self, rng: np.random.Generator, split: str) -> np.ndarray:
        return generate(self.name, 1, rng)[0]


@dataclass(frozen=True)
class VelocityFile:
    family: str
    path: Path
    count: int


class FileFamily:
    """The maps of one family's velocity files, in file order; map k validates when
    k % HELD_OUT_EVERY == HELD_OUT_EVERY - 1, trains otherwise. Files are memory-mapped when first
    read, in each process (never pickled into DataLoader workers)."""

    def __init__(self, name: str, files: list[VelocityFile]):
        self.name, self.files = name, files
        self.offsets = np.cumsum([0] + [f.count for f in files])
        total = int(self.offsets[-1])
        self.val_count = total // HELD_OUT_EVERY
        self.train_count = total - self.val_count
        self._maps: dict[int, np.ndarray] = {}

    def __getstate__(self):
        return {**vars(self), "_maps": {}}

    def draw(self, rng: np.random.Generator, split: str) -> np.ndarray:
        if split == "train":
            j = int(rng.integers(self.train_count))
            k = j + j // (HELD_OUT_EVERY - 1)  # skip the held-out maps
        else:
            if not self.val_count:
                raise UserError(f"{self.files[0].path.parent}: {self.name} has fewer than {HELD_OUT_EVERY} maps, so "
                                "none is held out to validate on; add maps or set data.val_roots")
            k = int(rng.integers(self.val_count)) * HELD_OUT_EVERY + HELD_OUT_EVERY - 1
        number = int(np.searchsorted(self.offsets, k, side="right")) - 1
        if number not in self._maps:
            self._maps[number] = np.load(self.files[number].path, mmap_mode="r")
        row = self._maps[number][k - int(self.offsets[number])]
        return np.array(row, dtype=np.float32).reshape(VELOCITY_SAMPLE_SHAPE)


def _velocity_files_in(folder: Path) -> list[Path]:
    return sorted((folder / "model").glob("model*.npy")) + sorted(folder.glob("vel*.npy"))


def find_velocity_files(roots: list[str], check: bool = True) -> list[VelocityFile]:
    """The velocity files under `roots` (each a family folder or a folder of them), with their
    shapes and (with `check`) value ranges checked."""
    found = []
    for root in map(Path, roots):
        if not root.is_dir():
            raise UserError(f"key 'data.velocity_roots': {str(root)!r} is not a directory")
        folders = [root] if _velocity_files_in(root) else sorted(d for d in root.iterdir() if d.is_dir() and _velocity_files_in(d))
        if not folders:
            raise UserError(f"{root}: no velocity files found (expected <Family>/model/model*.npy or <Family>/vel*.npy)")
        for folder in folders:
            for path in _velocity_files_in(folder):
                try:
                    maps = np.load(path, mmap_mode="r")
                except (ValueError, OSError, EOFError) as err:
                    raise UserError(f"{path}: not a readable .npy file ({err})") from None
                if maps.ndim != 4 or tuple(maps.shape[1:]) != VELOCITY_SAMPLE_SHAPE or maps.dtype.kind != "f" or not len(maps):
                    raise UserError(f"{path}: shape {maps.shape} {maps.dtype}, expected (n, 1, {MAP_SIZE}, {MAP_SIZE}) "
                                    "velocities in m/s")
                if check:
                    check_velocity_range(path)
                found.append(VelocityFile(folder.name, path, len(maps)))
    return found


def online_sources(data, check: bool = True) -> list:
    """Where draws come from, by family name: each family found under data.velocity_roots from its
    files, each other family of data.families from its generator."""
    files = find_velocity_files(data.velocity_roots, check) if data.velocity_roots else []
    by_family = {}
    for file in files:
        by_family.setdefault(file.family, []).append(file)
    sources = {name: FileFamily(name, members) for name, members in by_family.items()}
    sources |= {name: GeneratedFamily(name) for name in data.families if name not in sources}
    return [sources[name] for name in sorted(sources)]


def online_families(data) -> list[str]:
    """The family list (naming the per-family metrics) of data.source=online's datasets, found
    without building them."""
    if data.val_roots:
        return family_names(find_pairs(data.val_roots))
    return [source.name for source in online_sources(data, check=False)]


# ---- the draws -----------------------------------------------------------------------------------------


class OnlineDraws(Dataset):
    """`count` velocity draws per epoch; draw i of epoch e is a function of (seed, e, i) only (see
    the module docstring). Items: (None, velocity (1, 70, 70) float32, family index, True)."""

    def __init__(self, sources: list, count: int, families: list[str], seed: int, augment: list[str], flip: bool,
                 scale: tuple[float, float] | None = None):
        self.sources, self.count, self.seed, self.augment, self.flip = sources, count, seed, list(augment), flip
        self.scale = scale  # data.scale_augment: the map times a, before it is simulated (exact)
        self.family_index = [families.index(s.name) if s.name in families else NOT_VALIDATED for s in sources]
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.count

    def draw(self, index: int) -> tuple[np.ndarray, int]:
        """(velocity (1, 70, 70), source number) of draw `index` of the current epoch."""
        rng = np.random.default_rng([TRAIN_STREAM, self.seed, self.epoch, index])
        number = int(rng.integers(len(self.sources)))
        velocity = self.sources[number].draw(rng, "train")
        for name in self.augment:
            if rng.random() >= AUGMENT_PROBABILITY:
                continue
            if name == "affine":
                velocity = random_affine(velocity[None], rng)[0]
            elif name == "crop_resize":
                velocity = crop_resize(velocity[None], rng)[0]
            else:  # blend, with a second draw of any family
                other = self.sources[int(rng.integers(len(self.sources)))].draw(rng, "train")
                velocity = blend(velocity[None], other[None], rng)[0]
        if self.flip and rng.random() < 0.5:
            velocity = velocity[:, :, ::-1]
        if self.scale is not None:
            velocity = scale_map(velocity, scale_factor(rng, self.scale, velocity))
        return np.ascontiguousarray(velocity, dtype=np.float32), number

    def __getitem__(self, index: int):
        velocity, number = self.draw(index)
        return None, torch.from_numpy(velocity), self.family_index[number], True


def simulated_validation(sources: list, families: list[str], count: int, seed: int, nt: int) -> SeismicPairs:
    """`count` maps (equally many per source, none augmented) from the validation seed stream,
    simulated now on this process's device: a fixed validation set, the same at every start."""
    device = PartialState().device
    maps = {}
    for j in range(count):
        source = sources[j % len(sources)]
        maps.setdefault(source.name, []).append(source.draw(np.random.default_rng([VAL_STREAM, seed, j]), "val"))
    print(f"online data: simulating the {count}-sample validation set on {device}", file=sys.stderr, flush=True)
    batch = VALIDATION_BATCH.get(device.type, VALIDATION_BATCH["cpu"])
    pairs = []
    for name, family_maps in maps.items():
        velocity = np.stack(family_maps)
        seismic = [forward_model(torch.from_numpy(velocity[start:start + batch]).to(device), nt=nt).cpu().numpy()
                   for start in range(0, len(velocity), batch)]
        pairs.append(ArrayPair(name, np.concatenate(seismic), velocity))
    return SeismicPairs(pairs, families)


# ---- mixing ----------------------------------------------------------------------------------------------


def part_counts(base: int, fractions: list[float]) -> list[int]:
    """The samples per epoch of parts that take `fractions` of an epoch whose other samples are the
    `base` ones: the epoch is base / (1 - sum of fractions) samples."""
    if sum(fractions) >= 1:
        raise ConfigError(f"the shares of the training set's extra parts add up to {sum(fractions):g}; they must stay under 1")
    total = base / (1 - sum(fractions))
    return [round(total * f) for f in fractions]


class MixedTrainingSet(Dataset):
    """The parts' samples one after another: (seismic or None, velocity, family index, online)."""

    def __init__(self, parts: list[Dataset]):
        self.parts = [part for part in parts if len(part)]
        self.offsets = np.cumsum([0] + [len(part) for part in self.parts])

    def set_epoch(self, epoch: int) -> None:
        for part in self.parts:
            if hasattr(part, "set_epoch"):
                part.set_epoch(epoch)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, index: int):
        number = int(np.searchsorted(self.offsets, index, side="right")) - 1
        sample = self.parts[number][index - int(self.offsets[number])]
        return sample if len(sample) == 4 else (*sample, False)


class SampleFormat(NamedTuple):
    """How a training set's samples look, for a set that wraps it and serves stored samples of its
    own among them (`sample_format`): the seismic dtype, and whether samples carry the online flag."""
    dtype: torch.dtype
    online_flag: bool

    def stored(self, seismic: torch.Tensor, velocity: torch.Tensor, family: int) -> tuple:
        """A stored sample of the wrapping set in this format, so it stacks with the wrapped set's."""
        return (seismic.to(self.dtype), velocity, family) + ((False,) if self.online_flag else ())


def sample_format(dataset: Dataset) -> SampleFormat:
    """The format of a training set's samples: the dtype of a stored sample, or the simulator's
    float32 when the first sample is an online draw; the online flag when they carry one (a
    `MixedTrainingSet`'s do)."""
    first = dataset[0]
    return SampleFormat(torch.float32 if first[0] is None else first[0].dtype, len(first) == 4)


def collate(samples: list):
    """Batches of a `MixedTrainingSet`: (seismic, velocity, family, online (B,) bool). The rows of
    online draws are zeros until `OnlineSimulator` fills them; a batch of draws only carries a
    (B, 0) placeholder. Other batches (validation): PyTorch's default collation."""
    if len(samples[0]) != 4:
        return default_collate(samples)
    velocity, family, online = default_collate([s[1:] for s in samples])
    stored = [s[0] for s in samples if s[0] is not None]
    if not stored:
        seismic = torch.zeros(len(samples), 0)
    elif len(stored) == len(samples):
        seismic = torch.stack(stored)
    else:
        seismic = torch.zeros(len(samples), *stored[0].shape)
        seismic[~online] = torch.stack(stored).float()
    return seismic, velocity, family, online


# ---- simulation on the training device -------------------------------------------------------------------


class OnlineSimulator:
    """The gwi task's `prepare_batch` for online data: simulates the online rows of a training batch
    on its device (no gradients; `nt` time samples) and counts the time it takes."""

    def __init__(self, nt: int):
        self.nt = nt
        self.seconds, self.samples, self.since = 0.0, 0, None

    def __call__(self, batch, device):
        if len(batch) != 4:
            return batch
        if self.since is None:
            self.since = time.perf_counter()
        seismic, velocity, family, online = batch
        count = int(online.sum())
        if count == 0:
            return batch
        _synchronize(device)
        start = time.perf_counter()
        maps = velocity[online][:, 0]
        if device.type == "cuda" and count < len(velocity):
            # Padded to the batch size: one shape, so one captured CUDA graph (gwi.physics.triton_kernel).
            maps = torch.cat([maps, maps[:1].expand(len(velocity) - count, -1, -1)])
        with torch.no_grad():
            simulated = forward_model(maps, nt=self.nt)[:count]
        if count == len(velocity):
            seismic = simulated
        else:
            seismic = seismic.float()
            seismic[online] = simulated
        _synchronize(device)
        self.seconds += time.perf_counter() - start
        self.samples += count
        return seismic, velocity, family, online

    def throughput(self) -> dict[str, float]:
        """Since the last call: the share of the wall time spent simulating, and the samples simulated
        per second of it (train/simulation_share, train/simulated_per_s)."""
        now = time.perf_counter()
        if self.since is None or not self.samples:
            return {}
        values = {"train/simulation_share": self.seconds / max(now - self.since, 1e-9),
                  "train/simulated_per_s": self.samples / max(self.seconds, 1e-9)}
        self.seconds, self.samples, self.since = 0.0, 0, now
        return values


def _synchronize(device) -> None:
    if device.type == "cuda":  # the simulation runs asynchronously: time it to its end
        torch.cuda.synchronize(device)


# ---- the datasets --------------------------------------------------------------------------------------


def build_datasets(data, seed: int) -> tuple[MixedTrainingSet, SeismicPairs]:
    """(train, val) of online data as `data` (a GwiData section) describes; `seed` drives the file
    samples' flip (the draws' own flip is part of the draw)."""
    check_online(data)
    sources = online_sources(data)
    if data.source == "online":
        val_pairs = find_pairs(data.val_roots) if data.val_roots else []
        families = family_names(val_pairs) if val_pairs else [source.name for source in sources]
        val = SeismicPairs(val_pairs, families) if val_pairs else simulated_validation(
            sources, families, data.num_val, data.synth_seed, data.online_nt)
        parts, draws = [], data.num_train
    else:
        train_pairs, val_pairs = source_pairs(data)
        families = family_names(train_pairs + val_pairs)
        parts = [SeismicPairs(train_pairs, families, flip=data.flip, seed=seed, scale=data.scale_augment)]
        val = SeismicPairs(val_pairs, families)
        (draws,) = part_counts(len(parts[0]), [data.online_fraction])
    parts.append(OnlineDraws(sources, draws, families, data.synth_seed, data.online_augment, data.flip, data.scale_augment))
    return MixedTrainingSet(parts), val
