"""Tiny OpenFWI / Kaggle training trees in the exact on-disk layouts, with random values (plumbing
tests need the layout, not the physics)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

# family -> (layout, samples per file, number of files)
DEFAULT_FAMILIES = {"FlatVel_A": ("vel", 3, 2), "CurveFault_A": ("fault", 2, 3)}


def write_tree(root: Path, families: dict = DEFAULT_FAMILIES, dtype=np.float32, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for family, (layout, samples, files) in families.items():
        for k in range(1, files + 1):
            seismic = rng.normal(0, 3, (samples, 5, 1000, 70)).astype(dtype)
            velocity = rng.uniform(1500, 4500, (samples, 1, 70, 70)).astype(np.float32)
            if layout == "vel":
                paths = (root / family / "data" / f"data{k}.npy", root / family / "model" / f"model{k}.npy")
            else:
                paths = (root / family / f"seis{k}_1_0.npy", root / family / f"vel{k}_1_0.npy")
            for path, array in zip(paths, (seismic, velocity)):
                path.parent.mkdir(parents=True, exist_ok=True)
                np.save(path, array)
    return root


def write_test_dir(root: Path, ids: list[str], seed: int = 0) -> Path:
    """The Kaggle test layout: one (5, 1000, 70) float32 file per id."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for test_id in ids:
        np.save(root / f"{test_id}.npy", rng.normal(0, 3, (5, 1000, 70)).astype(np.float32))
    return root
