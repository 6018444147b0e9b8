"""The `simulated` data source (the demo's: configs/default.yaml, `make demo`): velocity maps of
OpenFWI-like families (`gwi.physics.velocity`) and their seismic from the OpenFWI-exact forward model
(`gwi.physics.forward_model`), made once into a folder of `data.cache_dir` named after what it holds:

    <data.cache_dir>/FlatVel_A+CurveVel_A_train352_val64_test48_seed0/
        spec.json                        what the folder holds, checked on every use
        train/<Family>/data/dataK.npy    OpenFWI layout: (n, 5, 1000, 70) float16 seismic (data.exact_flip:
                                         (n, 6, 1000, 70), the mirrored middle source added; folder name + _flip6)
        train/<Family>/model/modelK.npy                  (n, 1, 70, 70) float32 velocity, 500 a file
        val/<Family>/...                 the same for the validation maps
        test/<id>.npy                    Kaggle test layout: one (5, 1000, 70) float32 file per sample
        test_labels/<Family>/<id>.npy    its true (1, 70, 70) map, kept aside for scoring (gwi/report.py)

Family F's maps form one stream, map j drawn exactly as `python -m gwi.physics.synth --family F
--seed S` draws it (`shard_velocity`): train takes the first ones, val the next, test the next, so
no map is in two splits, and train/F is what that command writes with --float16. Samples are split
evenly over the families. Training seismic is float16 (half the disk: float32 would be 1.4 MB a
sample; the reader and the models take float16 as it is); test files are float32, as Kaggle ships
them. The files are written by synth's shard writer (`is_written`, `simulate_shard`,
`write_shard`), so generation is deterministic (the CPU simulator gives the same bits whatever the
batch), resumable (a piece whose files are all present is skipped; every file is written under a
temporary name and renamed) and skipped altogether once complete. Only the local main process
simulates; the other processes wait for it, then read.
"""
from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from accelerate.state import PartialState
from tqdm.auto import tqdm

from gwi.layout import SEISMIC_SAMPLE_SHAPE, VELOCITY_SAMPLE_SHAPE
from gwi.physics.acoustic import DEFAULTS, EXACT_FLIP_SOURCES, OPENFWI_SOURCES
from gwi.physics.synth import PER_FILE, Shard, ShardFile, is_written, openfwi_files, simulate_shard, write_shard
from harness.errors import UserError
from harness.files import write_text_atomic

SPLITS = ("train", "val", "test")
SPEC_FILE = "spec.json"
SIMULATION_BATCH = 8  # maps simulated together: the CPU simulator's sweet spot (bench/forward.py uses 8)
TRAIN_SEISMIC_DTYPE = np.dtype("float16")
TEST_SEISMIC_DTYPE = np.dtype("float32")
VELOCITY_DTYPE = np.dtype("float32")


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
            f"_seed{data.synth_seed}{'_flip6' if data.exact_flip else ''}")
    return Path(data.cache_dir).expanduser() / name


def spec(data) -> dict:
    """What a cache folder holds, as written to its spec.json: the folder name's settings plus the
    format ones (a later change of the format must not reuse an old folder)."""
    return {"families": list(data.families), "num_train": data.num_train, "num_val": data.num_val,
            "num_test": data.num_test, "seed": data.synth_seed, "per_file": PER_FILE,
            "train_seismic_dtype": str(TRAIN_SEISMIC_DTYPE), "test_seismic_dtype": str(TEST_SEISMIC_DTYPE),
            "simulator": "gwi.physics.forward_model with OpenFWI's defaults", "skip_steps": DEFAULTS["skip_steps"],
            "format": 1, **({"train_sources": len(EXACT_FLIP_SOURCES)} if data.exact_flip else {})}


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


def piece_sources(piece: Piece, exact_flip: bool) -> tuple:
    """The sources a piece is simulated with: with data.exact_flip the training pieces add the
    mirrored middle source (so the flip augmentation is exact); validation and test keep OpenFWI's 5."""
    return EXACT_FLIP_SOURCES if exact_flip and piece.split == "train" else OPENFWI_SOURCES


def piece_files(folder: Path, piece: Piece, seed: int, exact_flip: bool = False) -> list[ShardFile]:
    """The files a piece writes, in writing order: train and val in the OpenFWI layout; a test piece
    one seismic file per sample, then the true maps (last: the piece is complete once its last label
    is there)."""
    if piece.split != "test":
        return openfwi_files(folder / piece.split, piece.family, piece.shard, TRAIN_SEISMIC_DTYPE,
                             sources=len(piece_sources(piece, exact_flip)))
    first = piece.shard.start
    ids = [sample_id(piece.family, seed, position) for position in range(first, first + piece.shard.count)]
    return ([ShardFile(folder / "test" / f"{i}.npy", SEISMIC_SAMPLE_SHAPE, TEST_SEISMIC_DTYPE) for i in ids]
            + [ShardFile(folder / "test_labels" / piece.family / f"{i}.npy", VELOCITY_SAMPLE_SHAPE, VELOCITY_DTYPE) for i in ids])


def foreign(folder: Path) -> str:
    """The end of the message for a file of the folder that this code did not write for `data.*`."""
    return f"the folder {folder} holds other data than data.* describes: remove it and run again"


def missing_pieces(data) -> list[Piece]:
    folder = cache_folder(data)
    return [p for p in plan(data) if not is_written(piece_files(folder, p, data.synth_seed, data.exact_flip), foreign(folder))]


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
    todo = missing_pieces(data)
    if not todo:
        return []
    if not (folder / SPEC_FILE).is_file():  # first: a half-made folder already says what it is for
        folder.mkdir(parents=True, exist_ok=True)
        write_text_atomic(folder / SPEC_FILE, json.dumps(expected, indent=1))
    total = sum(p.shard.count for p in todo)
    print(f"simulated data: simulating {total} of {sum(p.shard.count for p in plan(data))} samples "
          f"({', '.join(data.families)}) into {folder}; done once, then read from there", file=sys.stderr, flush=True)
    with tqdm(total=total, unit="sample", desc="simulate", file=sys.stderr) as bar:
        for piece in todo:
            # On the CPU whatever the run's device: the CPU simulator gives the same bits for any
            # batch, so the cache is the same on every machine.
            seismic, velocity = simulate_shard(piece.family, data.synth_seed, piece.shard, batch_size=SIMULATION_BATCH,
                                               device="cpu", progress=bar.update,
                                               sources=piece_sources(piece, data.exact_flip))
            arrays = [*seismic, *velocity] if piece.split == "test" else [seismic, velocity]
            write_shard(piece_files(folder, piece, data.synth_seed, data.exact_flip), arrays)
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
            missing = missing_pieces(data)
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
