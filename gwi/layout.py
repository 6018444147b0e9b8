"""The data format of OpenFWI / Kaggle: its geometry and value range (the one home of these facts,
imported by the models, the submission, the simulator and the data readers), and the on-disk
layouts of training data, read as (seismic, velocity) file pairs.

Two layouts, per family folder (`<root>/<Family>/`), as in the Kaggle `train_samples/` and OpenFWI:
  Vel and Style families:  data/dataN.npy (n, 5, 1000, 70)  <->  model/modelN.npy (n, 1, 70, 70)
  Fault families:          seisX_Y_Z.npy  (n, 5, 1000, 70)  <->  velX_Y_Z.npy     (n, 1, 70, 70)
Training seismic may also hold 6 sources (n, 6, 1000, 70), the mirrored middle one added
(EXACT_FLIP_SOURCE_X; `python -m gwi.physics.synth --exact-flip`): read as the 5 OpenFWI sources,
flipped exactly.
Several roots may be combined (the competition samples plus external OpenFWI, say). Files are
float32 or float16 (see `python -m gwi.convert`). Only headers are read here (memory maps), so
discovery costs milliseconds whatever the data size; only the velocity files, 1.4 % of the bytes,
are read whole, once, to check their range.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from harness.errors import UserError
from harness.folds import assign_folds, check_one_fold

# The geometry: a MAP_SIZE x MAP_SIZE velocity map of 10 m cells; one source per seismic channel at
# the columns SOURCE_X, MAP_SIZE receivers (one per column), all at depth cell SENSOR_DEPTH; each
# trace TIME_STEPS samples at 1 ms.
MAP_SIZE = 70
SOURCE_X = (0, 17, 34, 52, 69)
# The middle source is not at the centre: x = 34 mirrors to x = 35. A gather simulated with that
# mirrored middle source too (6 sources, in the order EXACT_FLIP_SOURCE_X) reversed in source and
# receiver order is exactly the 6-source gather of the mirrored map; its channels FIVE_OF_SIX are
# the OpenFWI gather (`gwi.data.mirror`, `openfwi_sources`; 3rd place's trick).
EXACT_FLIP_SOURCE_X = (0, 17, 34, 35, 52, 69)
FIVE_OF_SIX = (0, 1, 2, 4, 5)
SENSOR_DEPTH = 1
TIME_STEPS = 1000
VELOCITY_MIN, VELOCITY_MAX = 1500.0, 4500.0  # m/s: every map lies in this range, every prediction is held to it

SEISMIC_SAMPLE_SHAPE = (len(SOURCE_X), TIME_STEPS, MAP_SIZE)
EXACT_FLIP_SAMPLE_SHAPE = (len(EXACT_FLIP_SOURCE_X), TIME_STEPS, MAP_SIZE)  # training files only
VELOCITY_SAMPLE_SHAPE = (1, MAP_SIZE, MAP_SIZE)
ALLOWED_DTYPES = (np.dtype("float32"), np.dtype("float16"))
MANIFEST = "manifest.json"
TRAINING_LAYOUTS = "<Family>/data/dataN.npy + <Family>/model/modelN.npy or <Family>/seisX.npy + <Family>/velX.npy"


@dataclass(frozen=True)
class FilePair:
    family: str
    seismic: Path
    velocity: Path
    samples: int

    def open(self) -> tuple[np.ndarray, np.ndarray]:
        """Memory maps of (seismic, velocity): nothing is read until a sample is indexed."""
        return np.load(self.seismic, mmap_mode="r"), np.load(self.velocity, mmap_mode="r")

    @property
    def name(self) -> str:
        """A stable name for the pair: family/file stem of the seismic file."""
        return f"{self.family}/{self.seismic.stem}"


def _header(path: Path) -> tuple[tuple[int, ...], np.dtype]:
    try:
        array = np.load(path, mmap_mode="r")
    except (ValueError, OSError, EOFError) as err:
        raise UserError(f"{path}: not a readable .npy file ({err})") from None
    return array.shape, array.dtype


def check_pair(seismic: Path, velocity: Path) -> int:
    """Shapes, dtypes and the velocity range of one pair; returns its sample count, or raises a
    UserError naming the file."""
    (s_shape, s_dtype), (v_shape, v_dtype) = _header(seismic), _header(velocity)
    if tuple(s_shape[1:]) == EXACT_FLIP_SAMPLE_SHAPE:  # the mirrored middle source included: also valid
        s_shape = (s_shape[0], *SEISMIC_SAMPLE_SHAPE)
    for path, shape, dtype, sample_shape in ((seismic, s_shape, s_dtype, SEISMIC_SAMPLE_SHAPE),
                                             (velocity, v_shape, v_dtype, VELOCITY_SAMPLE_SHAPE)):
        if len(shape) != 4 or tuple(shape[1:]) != sample_shape:
            raise UserError(f"{path}: shape {tuple(shape)}, expected (n, {', '.join(map(str, sample_shape))})")
        if dtype not in ALLOWED_DTYPES:
            raise UserError(f"{path}: dtype {dtype}, expected float32 or float16")
    if s_shape[0] != v_shape[0]:
        raise UserError(f"{seismic} holds {s_shape[0]} samples but its pair {velocity} holds {v_shape[0]}")
    check_velocity_range(velocity)
    return int(s_shape[0])


def check_velocity_range(path: Path) -> None:
    """Raise a UserError naming the file, the first bad sample and the file's range unless every
    value of the velocity file is finite and in [VELOCITY_MIN, VELOCITY_MAX]: a map in km/s or
    ft/s would otherwise train silently against a head that cannot reach it. One pass over the
    file (per-sample min and max), before any training."""
    maps = np.load(path, mmap_mode="r")
    flat = maps.reshape(len(maps), int(np.prod(maps.shape[1:])))
    low, high = flat.min(axis=1), flat.max(axis=1)  # NaN propagates: a NaN sample fails the test below
    bad = ~((low >= VELOCITY_MIN) & (high <= VELOCITY_MAX))
    if not bad.any():
        return
    first = int(np.argmax(bad))
    if not (np.isfinite(low[first]) and np.isfinite(high[first])):
        raise UserError(f"{path}: sample {first} contains NaN or inf values")
    raise UserError(f"{path}: velocities in [{float(low.min()):g}, {float(high.max()):g}] m/s (first at sample {first}), "
                    f"outside [{VELOCITY_MIN:g}, {VELOCITY_MAX:g}] m/s")


def _natural_key(path: Path):
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]


def _family_pairs(family_dir: Path) -> list[tuple[Path, Path]]:
    """(seismic, velocity) paths of one family folder, in either layout; unpaired files are errors."""
    pairs = []
    data_dir, model_dir = family_dir / "data", family_dir / "model"
    if data_dir.is_dir() or model_dir.is_dir():
        data = {p.name.removeprefix("data"): p for p in data_dir.glob("data*.npy")} if data_dir.is_dir() else {}
        model = {p.name.removeprefix("model"): p for p in model_dir.glob("model*.npy")} if model_dir.is_dir() else {}
        for key in sorted(data.keys() | model.keys()):
            if key not in model:
                raise UserError(f"{data[key]}: no matching velocity file {model_dir / ('model' + key)}")
            if key not in data:
                raise UserError(f"{model[key]}: no matching seismic file {data_dir / ('data' + key)}")
            pairs.append((data[key], model[key]))
    seis = {p.name.removeprefix("seis"): p for p in family_dir.glob("seis*.npy")}
    vel = {p.name.removeprefix("vel"): p for p in family_dir.glob("vel*.npy")}
    for key in sorted(seis.keys() | vel.keys()):
        if key not in vel:
            raise UserError(f"{seis[key]}: no matching velocity file {family_dir / ('vel' + key)}")
        if key not in seis:
            raise UserError(f"{vel[key]}: no matching seismic file {family_dir / ('seis' + key)}")
        pairs.append((seis[key], vel[key]))
    return sorted(pairs, key=lambda pair: _natural_key(pair[0]))


def _family_dirs(root: Path) -> list[Path]:
    """A root is a folder of family folders, or a single family folder itself."""
    if _family_pairs_present(root):
        return [root]
    return sorted(d for d in root.iterdir() if d.is_dir() and _family_pairs_present(d))


def has_training_data(root: str | os.PathLike) -> bool:
    """Whether `root` holds family folders (or is one), in either layout; files are not checked."""
    return bool(_family_dirs(Path(root)))


def _family_pairs_present(folder: Path) -> bool:
    return (folder / "data").is_dir() or (folder / "model").is_dir() or any(folder.glob("seis*.npy")) or any(folder.glob("vel*.npy"))


def find_pairs(roots: list[str | os.PathLike]) -> list[FilePair]:
    """Every (seismic, velocity) pair under `roots`, validated (shapes, dtypes, counts)."""
    pairs = []
    for root in map(Path, roots):
        if not root.is_dir():
            raise UserError(f"key 'data.roots': {str(root)!r} is not a directory")
        families = _family_dirs(root)
        if not families:
            raise UserError(f"{root}: no training data found (expected {TRAINING_LAYOUTS})")
        for family_dir in families:
            for seismic, velocity in _family_pairs(family_dir):
                pairs.append(FilePair(family_dir.name, seismic, velocity, check_pair(seismic, velocity)))
    return pairs


def split_pairs(pairs: list[FilePair], folds: int, fold: int, seed: int) -> tuple[list[FilePair], list[FilePair]]:
    """File-level train/validation split, stratified by family (harness.folds: each family's files
    are shuffled with `seed` and dealt round-robin into `folds` folds); fold `fold` validates, both
    lists keep the order of `pairs`. Splitting by file, not by sample, keeps the (often
    near-duplicate) samples of one simulation file on one side. A family with fewer files than folds
    still gets its first fold's share: at least one file validates when it has two or more; a
    family of one file always trains."""
    check_one_fold(fold, folds)
    families = sorted({p.family for p in pairs})
    assignment = assign_folds([families.index(p.family) for p in pairs], families, folds, seed)
    return ([p for p, f in zip(pairs, assignment) if f != fold], [p for p, f in zip(pairs, assignment) if f == fold])


def family_stats(pairs: list[FilePair]) -> dict[str, dict]:
    """Per family: files, samples, and velocity min / max / mean (velocity files are small to read)."""
    stats = {}
    for family in sorted({p.family for p in pairs}):
        members = [p for p in pairs if p.family == family]
        velocity = [np.load(p.velocity, mmap_mode="r") for p in members]
        stats[family] = {
            "files": len(members),
            "samples": sum(p.samples for p in members),
            "velocity_min": float(min(v.min() for v in velocity)),
            "velocity_max": float(max(v.max() for v in velocity)),
            "velocity_mean": float(sum(float(v.astype(np.float64).sum()) for v in velocity) / sum(v.size for v in velocity)),
        }
    return stats


@contextlib.contextmanager
def npy_writer(path: Path, dtype, shape: tuple[int, ...]):
    """A .npy memory map to fill, which appears at `path` only once the block ends without an error
    (written under a temporary name, its header checked, then renamed): an earlier file at `path`
    survives a failed run, and no half-written file ever carries the final name. Temporaries an
    interrupted earlier run left for the same path are removed once this one is in place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        array = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=tuple(shape))
        yield array
        array.flush()
        del array
        written = np.load(tmp, mmap_mode="r")
        if written.shape != tuple(shape) or written.dtype != np.dtype(dtype):
            raise OSError(f"{tmp}: wrote {written.shape} {written.dtype}, expected {tuple(shape)} {np.dtype(dtype)}")
        del written
        os.replace(tmp, path)
        for stale in path.parent.glob(f".{path.name}.*.tmp"):
            stale.unlink(missing_ok=True)
    finally:
        tmp.unlink(missing_ok=True)


def read_manifest(root: Path) -> dict | None:
    path = Path(root) / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None
