"""The built-in demo (configs/default.yaml, data.source=simulated: gwi/simulated.py, then gwi/report.py)
end to end through train.py with tiny sizes: the simulated cache in the OpenFWI / Kaggle layouts,
reused by a second run, holding the simulator's real output; the submission, test MAE, picture and
W&B entries of the report; the cache's checks (another size or seed, a foreign file, an
interrupted generation); and two processes, of which only the main one simulates and reports.
About 30 s on 2 cores."""
from __future__ import annotations

import json
import re
import shutil
import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from conftest import accelerate_launch, run_entry, wandb_log
from gwi.simulated import Piece, cache_folder, plan, simulate, split_evenly
from gwi.layout import find_pairs
from gwi.physics.acoustic import forward_model
from gwi.physics.synth import Shard
from gwi.physics.velocity import generate
from gwi.submission import validate_submission
from gwi.task import GwiData
from harness.config import load_config
from harness.errors import ConfigError, UserError
from harness.inference import load_ensemble

# The default config, shrunk: 3 + 1 + 2 samples per family, 6 updates (onecycle needs 5).
TINY = ["data.num_train=6", "data.num_val=2", "data.num_test=4", "trainer.epochs=2", "trainer.batch_size=2"]
FAMILIES = ("FlatVel_A", "CurveVel_A")  # the default config's, in its order


def tiny_data(cache: Path, **changes) -> GwiData:
    return GwiData(**{"source": "simulated", "num_train": 6, "num_val": 2, "num_test": 4, "cache_dir": str(cache), **changes})


def snapshot(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*")) if p.is_file()}


def summary_of(stdout: str) -> str:
    (line,) = [line for line in stdout.splitlines() if line.startswith("done: ")]
    return line


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """Two runs of the default config (no CONFIG argument) on one cache: the first simulates it,
    the second must only read it."""
    root = tmp_path_factory.mktemp("demo")
    cache = root / "cache"
    first = run_entry("train.py", *TINY, f"output_dir={root / 'run1'}", f"data.cache_dir={cache}")
    assert first.returncode == 0, first.stderr
    folder = cache_folder(tiny_data(cache))
    files_after_first = snapshot(folder)
    second = run_entry("train.py", *TINY, f"output_dir={root / 'run2'}", f"data.cache_dir={cache}", "log.wandb=disabled",
                       "log.plot=false")
    assert second.returncode == 0, second.stderr
    return SimpleNamespace(root=root, cache=cache, folder=folder, first=first, second=second, run=root / "run1",
                           files_after_first=files_after_first)


def test_default_config_is_the_simulated_demo():
    cfg = load_config(None)
    assert cfg.data.source == "simulated" and tuple(cfg.data.families) == FAMILIES
    assert 300 <= cfg.data.num_train + cfg.data.num_val <= 500 and 30 <= cfg.data.num_test <= 100  # about a minute to simulate
    assert cfg.model.name == "inversionnet" and cfg.model.width <= 0.5


def test_first_run_simulates_the_openfwi_and_kaggle_layouts(demo):
    assert "simulating 12 of 12 samples" in demo.first.stderr
    assert demo.folder.name == "FlatVel_A+CurveVel_A_train6_val2_test4_seed0"
    train, val = find_pairs([demo.folder / "train"]), find_pairs([demo.folder / "val"])  # validates shapes and dtypes
    assert {(p.family, p.seismic.relative_to(demo.folder).as_posix(), p.samples) for p in train} == {
        ("FlatVel_A", "train/FlatVel_A/data/data1.npy", 3), ("CurveVel_A", "train/CurveVel_A/data/data1.npy", 3)}
    assert {(p.family, p.velocity.relative_to(demo.folder).as_posix(), p.samples) for p in val} == {
        ("FlatVel_A", "val/FlatVel_A/model/model1.npy", 1), ("CurveVel_A", "val/CurveVel_A/model/model1.npy", 1)}
    assert all(np.load(p.seismic, mmap_mode="r").dtype == np.float16 for p in train + val)
    tests = sorted((demo.folder / "test").glob("*.npy"))
    assert len(tests) == 4 and all(re.fullmatch(r"[0-9a-f]{10}", p.stem) for p in tests)  # ids say nothing of the family
    for path in tests:
        seismic = np.load(path)
        assert seismic.shape == (5, 1000, 70) and seismic.dtype == np.float32 and np.isfinite(seismic).all()
    labels = sorted((demo.folder / "test_labels").glob("*/*.npy"))
    assert sorted(p.stem for p in labels) == [p.stem for p in tests]
    assert sorted(p.parent.name for p in labels) == sorted(FAMILIES * 2)
    assert json.loads((demo.folder / "spec.json").read_text())["families"] == list(FAMILIES)


def test_second_run_reads_the_cache_without_simulating(demo):
    assert "simulating" not in demo.second.stderr and "simulate" not in demo.second.stderr
    assert snapshot(demo.folder) == demo.files_after_first  # no file rewritten, none added
    assert re.search(r"test_mae=[\d.]+", summary_of(demo.second.stdout))


def test_simulated_pairs_are_the_simulators_output(demo):
    """Family F's map j is drawn by a generator seeded with (seed, crc32(F), j), as
    `python -m gwi.physics.synth` draws it: train takes j = 0, 1, 2, val j = 3, test j = 4, 5."""
    def drawn(family, j):
        return generate(family, 1, np.random.default_rng([0, zlib.crc32(family.encode()), j]))

    seismic = np.load(demo.folder / "train/FlatVel_A/data/data1.npy")
    velocity = np.load(demo.folder / "train/FlatVel_A/model/model1.npy")
    np.testing.assert_array_equal(velocity, np.concatenate([drawn("FlatVel_A", j) for j in range(3)]))
    np.testing.assert_array_equal(seismic[1], forward_model(velocity[1:2])[0].astype(np.float16))
    np.testing.assert_array_equal(np.load(demo.folder / "val/CurveVel_A/model/model1.npy"), drawn("CurveVel_A", 3))

    label = sorted((demo.folder / "test_labels" / "CurveVel_A").glob("*.npy"))[0]
    assert any(np.array_equal(np.load(label)[None], drawn("CurveVel_A", j)) for j in (4, 5))
    np.testing.assert_array_equal(np.load(demo.folder / "test" / label.name), forward_model(np.load(label)[None])[0])


def test_report_writes_a_valid_submission_scored_by_the_printed_mae(demo):
    ids = sorted(p.stem for p in (demo.folder / "test").glob("*.npy"))
    submission = demo.run / "submission.csv"
    validate_submission(submission, ids)
    summary = summary_of(demo.first.stdout)
    assert f"submission={submission}" in summary and f"picture={demo.run / 'predictions.png'}" in summary

    # The CSV holds the best checkpoint's flip-TTA predictions ...
    rows = np.loadtxt(submission, delimiter=",", skiprows=1, usecols=range(1, 36)).reshape(4, 70, 35)
    task, _, model = load_ensemble([str(demo.run)])
    task.tta = "flip"
    seismic = torch.stack([torch.from_numpy(np.load(demo.folder / "test" / f"{i}.npy")) for i in ids])
    with torch.no_grad():
        expected = task.predict(model.eval(), (seismic,))[:, 0, :, 1::2].numpy()
    np.testing.assert_allclose(rows, expected, atol=0.051)  # written to 0.1 m/s

    # ... and the printed test MAE is that CSV scored against the true maps (odd columns).
    truth = {p.stem: (p.parent.name, np.load(p)[0]) for p in (demo.folder / "test_labels").glob("*/*.npy")}
    errors = np.array([np.abs(rows[k] - truth[i][1][:, 1::2]).mean() for k, i in enumerate(ids)])
    printed = float(re.search(r"test_mae=([\d.]+)", summary).group(1))
    assert printed == pytest.approx(errors.mean(), abs=0.006)
    for family in FAMILIES:
        in_family = [truth[i][0] == family for i in ids]
        assert re.search(rf"\b{family} {errors[in_family].mean():.2f}\b", demo.first.stdout)
    assert re.search(r"val MAE [\d.]+ m/s after the first evaluation, [\d.]+ after the last", demo.first.stdout)


def test_report_draws_the_picture_and_logs_it_to_wandb(demo):
    import matplotlib.image

    picture = demo.run / "predictions.png"
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = matplotlib.image.imread(picture)
    assert image.ndim == 3 and image.shape[0] > 400 and image[..., :3].std() > 0.05  # 4 rows of panels, not blank

    history, summary = wandb_log(demo.run)
    (logged,) = [row for row in history if "test/mae" in row]
    assert logged["test/predictions/_type"] == "image-file"  # the record flattens the image's entry
    (files,) = demo.run.glob("wandb/offline-run-*/files")
    assert (files / logged["test/predictions/path"]).read_bytes() == picture.read_bytes()
    assert set(logged) >= {f"test/mae_{f}" for f in FAMILIES} | {"test/mae_mean_map"}
    printed = float(re.search(r"test_mae=([\d.]+)", summary_of(demo.first.stdout)).group(1))
    assert summary["test/mae"] == pytest.approx(printed, abs=0.006)


# ---- the cache's checks, in-process -----------------------------------------------------------------------


def test_sizes_and_seed_name_the_folder(tmp_path):
    base = cache_folder(tiny_data(tmp_path))
    changed = [tiny_data(tmp_path, synth_seed=1), tiny_data(tmp_path, num_train=8), tiny_data(tmp_path, num_test=0),
               tiny_data(tmp_path, families=["FlatVel_A"]), tiny_data(tmp_path, families=["CurveVel_A", "FlatVel_A"])]
    names = {cache_folder(data).name for data in changed}
    assert base.name not in names and len(names) == len(changed)
    assert all(cache_folder(data).parent == tmp_path for data in changed)


def test_plan_splits_each_familys_stream_into_train_val_test(tmp_path):
    assert split_evenly(7, ["a", "b", "c"]) == [3, 2, 2]
    pieces = plan(tiny_data(tmp_path, num_train=1001, num_val=3, num_test=2, families=["Style_A"]))
    assert pieces == [Piece("train", "Style_A", Shard(1, 500, 0)), Piece("train", "Style_A", Shard(2, 500, 500)),
                      Piece("train", "Style_A", Shard(3, 1, 1000)), Piece("val", "Style_A", Shard(1, 3, 1001)),
                      Piece("test", "Style_A", Shard(1, 2, 1004))]


def test_bad_families_are_config_errors():
    with pytest.raises(ValidationError, match="unknown families 'FlatVel_C'"):
        GwiData(families=["FlatVel_A", "FlatVel_C"])
    with pytest.raises(ValidationError, match="listed twice"):
        GwiData(families=["FlatVel_A", "FlatVel_A"])
    with pytest.raises(ConfigError, match="data.families"):
        load_config(None, ["data.families=[]"])


def test_an_interrupted_cache_is_completed_and_a_foreign_one_refused(demo, tmp_path):
    folder = tmp_path / demo.folder.name
    shutil.copytree(demo.folder, folder)
    data = tiny_data(tmp_path)
    assert simulate(data) == []  # complete: nothing to do

    # An interrupted generation: the missing piece alone is simulated again, to the same bits.
    lost = folder / "val/CurveVel_A/model/model1.npy"
    lost.unlink()
    before = snapshot(folder)
    assert simulate(data) == [Piece("val", "CurveVel_A", Shard(1, 1, 3))]
    after = snapshot(folder)
    assert {k for k in after if after[k] != before.get(k)} == {"val/CurveVel_A/data/data1.npy", "val/CurveVel_A/model/model1.npy"}
    np.testing.assert_array_equal(np.load(lost), np.load(demo.folder / "val/CurveVel_A/model/model1.npy"))

    # A file of another shape is not ours to overwrite; nor is a folder whose spec says otherwise.
    np.save(lost, np.zeros((2, 1, 70, 70), np.float32))
    with pytest.raises(UserError, match=rf"{re.escape(str(lost))} exists with shape \(2, 1, 70, 70\), expected \(1, 1, 70, 70\); "
                                        rf"the folder {re.escape(str(folder))} holds other data"):
        simulate(data)
    spec = json.loads((folder / "spec.json").read_text())
    (folder / "spec.json").write_text(json.dumps({**spec, "per_file": 100}))
    with pytest.raises(UserError, match="differs in per_file"):
        simulate(data)
    # A cache from before the time axis was aligned with the port's (no skip_steps in its spec).
    (folder / "spec.json").write_text(json.dumps({key: value for key, value in spec.items() if key != "skip_steps"}))
    with pytest.raises(UserError, match="differs in skip_steps"):
        simulate(data)


@pytest.mark.slow  # two processes: ~12 s (make test-all runs it)
def test_two_processes_simulate_once_and_report_once(tmp_path):
    """Only the main process simulates (the other waits, then reads) and reports; both exit."""
    # 3 samples a process and batch 1: the 6 updates onecycle needs.
    result = accelerate_launch(2, "train.py", *TINY, "data.num_test=2", "trainer.batch_size=1", f"output_dir={tmp_path / 'run'}",
                               f"data.cache_dir={tmp_path / 'cache'}", "log.wandb=disabled", "log.plot=false")
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("simulating 10 of 10 samples") == 1
    assert result.stdout.count("done: ") == 1 and result.stdout.count("test MAE") == 1
    validate_submission(tmp_path / "run" / "submission.csv", sorted(p.stem for p in (tmp_path / "cache").glob("*/test/*.npy")))
