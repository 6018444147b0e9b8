"""k-fold cross-validation: which samples validate in which fold, and where a folds run keeps its folds.

The assignment is stratified and stable: each stratum's units (samples, or groups of samples that
must stay together, such as the samples of one simulation file) are shuffled by a generator seeded
with (seed, a hash of the stratum's name) and dealt round-robin into the folds. It is a function of
the seed and the task's sample list only, never of file-system order or of the process: the tasks
list their samples in a fixed order (`Task.fold_samples`). A stratum with a single unit is never
held out (it could not be both trained on and validated), so it has no out-of-fold prediction.

This module needs only numpy: gwi's data layout (light, imported by the simulator) uses it too.
"""
from __future__ import annotations

import re
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from harness.errors import ConfigError, UserError

NEVER_HELD_OUT = -1  # the fold of a unit that always trains (its stratum has no second unit)
FOLD_DIR = "fold_{}"  # <output_dir>/fold_<k>: the run of fold k in a data.fold=all run
FOLD_DIR_PATTERN = re.compile(r"^fold_(\d+)$")
CV_FILE, OOF_NPY, OOF_CSV = "cv.json", "oof.npy", "oof.csv"


@dataclass
class FoldSamples:
    """A task's whole training set as k-fold sees it (`Task.fold_samples`), one entry per sample in
    the task's own fixed order."""

    strata: np.ndarray  # (N,) int: each sample's stratum (class, family) as an index into `names`
    names: list[str]  # the strata's names
    ids: list[str]  # a unique name per sample (oof.csv's id column)
    key: str = "stratum"  # what a stratum is ("label", "family"): oof.csv's column, cv.json's by_<key>
    groups: np.ndarray | None = None  # (N,): samples sharing a value stay in one fold (gwi: one file); None: each alone


def check_fold(fold, folds: int) -> None:
    """A fold number must name one of the folds."""
    if isinstance(fold, int) and not 0 <= fold < folds:
        raise ConfigError(f"key 'data.fold': {fold} is not in 0..{folds - 1} (data.folds={folds}), nor all")


def check_one_fold(fold, folds: int) -> None:
    """What builds datasets works on one fold; `all` is train.py's loop over them (harness.crossval)."""
    if fold == "all":
        raise ConfigError("key 'data.fold': all trains every fold in turn, which train.py does; this command works on "
                          f"one fold: data.fold=0..{folds - 1}")
    check_fold(fold, folds)


def stable_hash(text: str) -> int:
    return zlib.crc32(text.encode())  # Python's hash() of a str changes with every process


def assign_folds(strata, names: list[str], folds: int, seed: int, groups=None) -> np.ndarray:
    """The fold of every sample, (N,) int (NEVER_HELD_OUT for a stratum with one unit). `strata`:
    each sample's index into `names`; `groups`: samples with the same group id form one unit (its
    first sample's stratum is the unit's), None: each sample is its own unit."""
    strata = np.asarray(strata, dtype=np.int64)
    groups = np.arange(len(strata)) if groups is None else np.asarray(groups)
    unit_ids, first, unit_of_sample = np.unique(groups, return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")  # units in the order of their first sample
    unit_stratum = strata[first[order]]
    unit_fold = np.empty(len(unit_ids), dtype=np.int64)
    for stratum in np.unique(unit_stratum):
        members = order[unit_stratum == stratum]
        if len(members) == 1:
            unit_fold[members] = NEVER_HELD_OUT
            continue
        shuffled = np.random.default_rng([seed, stable_hash(names[stratum])]).permutation(len(members))
        unit_fold[members[shuffled]] = np.arange(len(members)) % folds
    return unit_fold[unit_of_sample.reshape(-1)]


def fold_indices(samples: FoldSamples, folds: int, fold: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(training, validation) sample indices of fold `fold`, each in the samples' own order."""
    check_one_fold(fold, folds)
    assignment = assign_folds(samples.strata, samples.names, folds, seed, samples.groups)
    val = np.flatnonzero(assignment == fold)
    if not len(val):
        raise UserError(f"key 'data.folds': fold {fold} of {folds} holds no sample (no {samples.key} has two "
                        f"{'groups' if samples.groups is not None else 'samples'}); use fewer folds or more data")
    return np.flatnonzero(assignment != fold), val


def fold_run_dirs(path) -> list[Path]:
    """The fold runs of a data.fold=all run folder (`fold_0`, `fold_1`, ... in fold order); [] when
    `path` is not one."""
    path = Path(path)
    if not path.is_dir() or (path / "checkpoints").exists():
        return []
    found = {int(m.group(1)): p for p in path.iterdir() if p.is_dir() and (m := FOLD_DIR_PATTERN.match(p.name))}
    return [found[k] for k in sorted(found)]
