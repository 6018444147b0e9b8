"""gwi data: both file layouts, validation errors that name the file, the stratified file split,
memory-mapped datasets, and the float16 converter."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, default_collate

from conftest import read_metrics
from gwi.convert import convert
from gwi.convert import main as convert_main
from gwi.data import SeismicPairs, build_datasets
from gwi.layout import MANIFEST, find_pairs, split_pairs
from gwi.task import GwiData
from gwi_files import write_tree
from harness.config import load_config
from harness.errors import UserError
from harness.loop import train
from harness.task import get_task
from conftest import SMOKE_GWI


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return write_tree(tmp_path_factory.mktemp("train_samples"))


def test_finds_pairs_in_both_layouts(tree):
    pairs = find_pairs([tree])
    assert [(p.family, p.seismic.name, p.velocity.name, p.samples) for p in pairs] == [
        ("CurveFault_A", "seis1_1_0.npy", "vel1_1_0.npy", 2), ("CurveFault_A", "seis2_1_0.npy", "vel2_1_0.npy", 2),
        ("CurveFault_A", "seis3_1_0.npy", "vel3_1_0.npy", 2),
        ("FlatVel_A", "data1.npy", "model1.npy", 3), ("FlatVel_A", "data2.npy", "model2.npy", 3)]
    assert find_pairs([tree / "FlatVel_A"]) == pairs[3:]  # a single family folder is a root too


@pytest.mark.parametrize("damage, message", [
    (lambda t: (t / "FlatVel_A" / "model" / "model2.npy").unlink(), "data2.npy: no matching velocity file"),
    (lambda t: (t / "CurveFault_A" / "seis1_1_0.npy").unlink(), "vel1_1_0.npy: no matching seismic file"),
    (lambda t: np.save(t / "FlatVel_A" / "data" / "data1.npy", np.zeros((3, 5, 999, 70), np.float32)),
     "data1.npy: shape (3, 5, 999, 70), expected (n, 5, 1000, 70)"),
    (lambda t: np.save(t / "FlatVel_A" / "model" / "model1.npy", np.zeros((3, 1, 70, 70), np.int16)),
     "model1.npy: dtype int16, expected float32 or float16"),
    (lambda t: np.save(t / "FlatVel_A" / "model" / "model1.npy", np.zeros((2, 1, 70, 70), np.float32)),
     "data1.npy holds 3 samples but its pair"),
])
def test_bad_files_are_named(tmp_path, damage, message):
    root = write_tree(tmp_path / "t", {"FlatVel_A": ("vel", 3, 2), "CurveFault_A": ("fault", 2, 1)})
    damage(root)
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        find_pairs([root])


def test_nan_sample_is_named_when_read(tmp_path):
    root = write_tree(tmp_path / "t", {"FlatVel_A": ("vel", 3, 1)})
    seismic = np.load(root / "FlatVel_A" / "data" / "data1.npy")
    seismic[2, 1, 10, 5] = np.nan
    np.save(root / "FlatVel_A" / "data" / "data1.npy", seismic)
    dataset = SeismicPairs(find_pairs([root]), ["FlatVel_A"])
    dataset[1]
    with pytest.raises(UserError, match=r"data1.npy: sample 2 contains NaN or inf"):
        dataset[2]


def test_file_split_is_stratified_deterministic_and_complete(tree):
    pairs = find_pairs([tree])
    folds = [split_pairs(pairs, folds=2, fold=f, seed=7) for f in range(2)]
    for train, val in folds:
        assert {p.family for p in val} == {"CurveFault_A", "FlatVel_A"}  # every family validates
        assert not set(train) & set(val) and set(train) | set(val) == set(pairs)
    assert set(folds[0][1]).isdisjoint(folds[1][1])  # the folds' validation files differ
    assert split_pairs(pairs, 2, 0, seed=7) == folds[0]
    with pytest.raises(UserError, match="data.fold"):
        split_pairs(pairs, folds=2, fold=2, seed=0)


def test_memmap_dataset_keeps_float16_and_works_with_workers(tmp_path, tree):
    half = tmp_path / "half"
    convert(tree, half)
    train, val = build_datasets(GwiData(source="files", roots=[str(half)], folds=2, flip=True), seed=0)
    seismic, velocity, family = train[0]
    assert seismic.dtype == torch.float16 and seismic.shape == (5, 1000, 70) and velocity.dtype == torch.float32
    assert isinstance(train._opened[0][0], np.memmap)  # mapped, not loaded
    assert len(train) + len(val) == 12
    batches = list(DataLoader(train, batch_size=2, num_workers=2))
    assert sum(len(b[0]) for b in batches) == len(train)
    # the float16 copy holds the float32 data to float16 precision, velocity exactly
    original, _ = build_datasets(GwiData(source="files", roots=[str(tree)], folds=2, flip=False), seed=0)
    converted, _ = build_datasets(GwiData(source="files", roots=[str(half)], folds=2, flip=False), seed=0)
    torch.testing.assert_close(converted[3][0].float(), original[3][0], rtol=1e-3, atol=2e-3)
    assert torch.equal(converted[3][1], original[3][1])


def test_convert_writes_layout_and_manifest_resumes_and_refuses_overwrite(tmp_path, tree):
    dst = tmp_path / "f16"
    manifest = convert(tree, dst)
    assert (dst / "FlatVel_A" / "data" / "data2.npy").exists() and (dst / "CurveFault_A" / "vel3_1_0.npy").exists()
    assert np.load(dst / "FlatVel_A" / "data" / "data1.npy", mmap_mode="r").dtype == np.float16
    assert manifest["families"]["FlatVel_A"]["samples"] == 6 and manifest["families"]["CurveFault_A"]["files"] == 3
    velocity = np.load(tree / "FlatVel_A" / "model" / "model1.npy")
    assert manifest["files"][3]["velocity"]["max"] == pytest.approx(float(velocity.max()))
    with pytest.raises(UserError, match="refusing to overwrite"):
        convert(tree, dst)
    # an interrupted run: no manifest yet, one file missing, a stale temporary file
    (dst / MANIFEST).unlink()
    (dst / "FlatVel_A" / "data" / "data2.npy").unlink()
    (dst / "FlatVel_A" / "data" / ".data2.npy.4242.tmp").write_bytes(b"partial")
    assert convert(tree, dst)["files"] == manifest["files"]
    assert json.loads((dst / MANIFEST).read_text())["files"] == manifest["files"]
    assert not list(dst.rglob("*.tmp"))


def test_trains_on_files_with_per_family_metrics(tmp_path, tree):
    cfg = load_config(SMOKE_GWI, [f"output_dir={tmp_path / 'run'}", "data.source=files", f"data.roots=[{tree}]",
                                  "data.folds=2", "trainer.epochs=1", "trainer.batch_size=2", "log.wandb=disabled",
                                  "data.time_steps=64"])
    train(cfg)
    final = read_metrics(tmp_path / "run")[-1]
    assert {"val/mae", "val/mae_odd", "val/mae_FlatVel_A", "val/mae_CurveFault_A"} <= final.keys()
    assert 0 < final["val/mae_FlatVel_A"] < 3000


def test_metrics_name_the_families_without_build_datasets(tree):
    """A task instance that built no datasets (e.g. one rebuilt from a checkpoint to evaluate) still
    reports the per-family values, under the same names, with the same numbers."""
    cfg = load_config(SMOKE_GWI, ["data.source=files", f"data.roots=[{tree}]", "data.folds=2"])
    built = get_task("gwi", cfg)
    _, val = built.build_datasets(cfg)
    batch = default_collate([val[i] for i in range(len(val))])
    outputs = torch.full_like(batch[1], 3000.0)
    expected = built.metrics(outputs, batch)
    assert {"mae_CurveFault_A", "mae_FlatVel_A"} <= expected.keys()
    fresh = get_task("gwi", cfg).metrics(outputs, batch)
    assert fresh.keys() == expected.keys()
    for name, values in expected.items():
        torch.testing.assert_close(fresh[name], values, equal_nan=True)


@pytest.mark.parametrize("value", [100.0, 13_500.0])
def test_velocities_out_of_range_are_named_before_any_work(tmp_path, capsys, value):
    """Labels in km/s or ft/s stop data.source=files (and infer.py on a labelled folder, which reads
    through find_pairs too) and gwi.convert with one line naming the file, the sample and the range."""
    root = write_tree(tmp_path / "t", {"FlatVel_A": ("vel", 3, 2)})
    path = root / "FlatVel_A" / "model" / "model2.npy"
    velocity = np.load(path)
    velocity[1, 0, 5, 5] = value
    np.save(path, velocity)
    low, high = min(value, float(velocity.min())), max(value, float(velocity.max()))
    message = (rf"{re.escape(str(path))}: velocities in \[{low:g}, {high:g}\] m/s \(first at sample 1\), "
               r"outside \[1500, 4500\] m/s")
    with pytest.raises(UserError, match=message):
        build_datasets(GwiData(source="files", roots=[str(root)], folds=2), seed=0)
    with pytest.raises(UserError, match=message):
        find_pairs([root / "FlatVel_A"])  # what infer.py --data reads a labelled folder with

    assert convert_main([str(root), str(tmp_path / "f16")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and re.fullmatch("error: " + message, lines[0]), lines
    assert not list((tmp_path / "f16").rglob("*.npy"))  # refused before anything was written


def test_nan_velocity_is_named_before_any_work(tmp_path):
    root = write_tree(tmp_path / "t", {"FlatVel_A": ("vel", 3, 2)})
    path = root / "FlatVel_A" / "model" / "model1.npy"
    velocity = np.load(path)
    velocity[2, 0, 0, 0] = np.nan
    np.save(path, velocity)
    with pytest.raises(UserError, match=rf"{re.escape(str(path))}: sample 2 contains NaN or inf values"):
        find_pairs([root])
