"""Online data (gwi/online.py: velocity draws simulated on the training device) and the exact flip
(the mirrored middle source). Simulations are short (online_nt 100-150 time steps) or few."""
from __future__ import annotations

import multiprocessing
import os
import signal

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import SMOKE_GWI, accelerate_launch, read_metrics
from gwi import online
from gwi.data import SeismicPairs, flip_decision, mirror, openfwi_sources
from gwi.layout import FIVE_OF_SIX, find_pairs
from gwi.physics import synth
from gwi.physics.acoustic import EXACT_FLIP_SOURCES, forward_model
from gwi.simulated import cache_folder, spec
from gwi.physics.velocity import generate
from gwi.task import GwiData, GwiTask
from gwi_files import write_tree
from harness import checkpoint as ckpt
from harness.config import load_config
from harness.errors import ConfigError, UserError
from harness.loop import train
from harness.lr_find import lr_find

pytestmark = pytest.mark.usefixtures("one_thread")

# 8 updates (2 epochs of 4 batches of 4 draws, 50 time steps), `last` every 2; affine, crop-resize, blend and flip
# all drawn per (seed, epoch, index).
ONLINE = ["data.source=online", "data.online_nt=50", "data.time_steps=50", "data.num_train=16", "data.num_val=4",
          "trainer.batch_size=4", "trainer.epochs=2",
          "trainer.save_every_steps=2", "trainer.deterministic=true", "log.wandb=disabled", "log.plot=false",
          "log.progress=none", "data.online_augment=[affine,crop_resize,blend]", "data.families=[FlatVel_A,CurveFault_B]"]


def online_data(**changes) -> GwiData:
    return GwiData(**{"source": "online", "online_nt": 100, "time_steps": 100, "num_train": 16, "num_val": 4,
                      "online_augment": ["affine", "crop_resize", "blend"], **changes})


# ---- the exact flip ---------------------------------------------------------------------------------------


def test_flipping_a_six_source_gather_is_the_gather_of_the_mirrored_map():
    velocity = torch.from_numpy(generate("CurveFault_B", 1, np.random.default_rng(3)))  # no mirror symmetry
    six = forward_model(velocity, nt=150, sources=EXACT_FLIP_SOURCES)[0]
    mirrored_map = velocity.flip(dims=(3,))
    truth = forward_model(mirrored_map, nt=150)[0]  # OpenFWI's 5 sources on the mirrored map
    flipped, flipped_map = mirror(six, velocity[0])
    assert torch.equal(flipped_map, mirrored_map[0])
    peak = truth.abs().max()
    assert (openfwi_sources(flipped) - truth).abs().max() <= 1e-5 * peak  # float rounding of the stencil's sums
    assert torch.equal(openfwi_sources(six), six[list(FIVE_OF_SIX)])
    # The 5-source flip puts the middle shot at x = 35 where it was fired at x = 34: clearly not exact.
    naive, _ = mirror(six[list(FIVE_OF_SIX)], velocity[0])
    assert (naive[2] - truth[2]).abs().max() > 0.05 * peak
    assert (naive[[0, 1, 3, 4]] - truth[[0, 1, 3, 4]]).abs().max() <= 1e-5 * peak


def test_synth_exact_flip_files_are_read_as_five_sources_and_flipped_exactly(tmp_path):
    assert synth.main(["--family", "FlatFault_B", "--n", "1", "--exact-flip", "--threads", "1", "--out", str(tmp_path)]) == 0
    assert np.load(tmp_path / "FlatFault_B" / "data" / "data1.npy", mmap_mode="r").shape == (1, 6, 1000, 70)
    pairs = find_pairs([tmp_path])  # a 6-source training file is valid
    plain = SeismicPairs(pairs, ["FlatFault_B"])[0]
    flipping = SeismicPairs(pairs, ["FlatFault_B"], flip=True)
    flipping.set_epoch(next(e for e in range(50) if flip_decision(flipping.seed, e, 0)))
    seismic, velocity, _ = flipping[0]
    assert plain[0].shape == seismic.shape == (5, 1000, 70) and torch.equal(velocity, plain[1].flip(dims=(2,)))
    truth = forward_model(velocity)[0]
    assert (seismic - truth).abs().max() <= 1e-5 * truth.abs().max()


def test_the_simulated_source_caches_six_sources_only_with_exact_flip(tmp_path):
    plain, exact = GwiData(source="simulated", cache_dir=str(tmp_path)), GwiData(source="simulated", cache_dir=str(tmp_path), exact_flip=True)
    assert "train_sources" not in spec(plain) and not cache_folder(plain).name.endswith("_flip6")  # the demo's cache stays valid
    assert spec(exact)["train_sources"] == 6 and cache_folder(exact).name == cache_folder(plain).name + "_flip6"


# ---- draws ------------------------------------------------------------------------------------------------


def test_a_draw_is_a_function_of_seed_epoch_and_index_only():
    data = online_data(flip=True)
    train, _ = online.build_datasets(data, seed=0)
    again, _ = online.build_datasets(data, seed=5)  # a new process, say; the run seed does not enter
    draws = [train[i][1] for i in range(6)]
    assert all(torch.equal(again[i][1], draws[i]) for i in reversed(range(6)))  # any order
    train.set_epoch(1)
    assert not any(torch.equal(train[i][1], draws[i]) for i in range(6))  # a fresh map every epoch
    other, _ = online.build_datasets(online_data(flip=True, synth_seed=1), seed=0)
    assert not torch.equal(other[0][1], draws[0])
    sample = train[0]
    assert sample[0] is None and sample[3] is True and sample[1].shape == (1, 70, 70)
    assert 1500 <= float(sample[1].min()) <= float(sample[1].max()) <= 4500


def test_the_same_draw_yields_the_same_seismic_in_any_batch():
    train, _ = online.build_datasets(online_data(), seed=0)
    simulator = online.OnlineSimulator(100)
    batch = simulator(online.collate([train[i] for i in range(4)]), torch.device("cpu"))
    alone = simulator(online.collate([train[2]]), torch.device("cpu"))
    assert batch[0].shape == (4, 5, 100, 70) and torch.equal(batch[0][2], alone[0][0])
    assert torch.equal(batch[0][1], forward_model(batch[1][1:2], nt=100)[0])
    assert set(simulator.throughput()) == {"train/simulation_share", "train/simulated_per_s"}


def test_velocity_files_are_drawn_with_every_tenth_map_held_out(tmp_path):
    maps = np.stack([np.full((1, 70, 70), 1500.0 + 10 * k, dtype=np.float32) for k in range(20)])
    (tmp_path / "Real" / "model").mkdir(parents=True)
    np.save(tmp_path / "Real" / "model" / "model1.npy", maps[:12])
    np.save(tmp_path / "Real" / "model" / "model2.npy", maps[12:])
    data = online_data(velocity_roots=[str(tmp_path)], families=["FlatVel_A"], online_augment=[], flip=False)
    train, val = online.build_datasets(data, seed=0)
    assert val.families == ["FlatVel_A", "Real"] and online.online_families(data) == val.families
    real = val.families.index("Real")
    seen = {int(train[i][1][0, 0, 0] - 1500) // 10 for e in range(8) if not train.set_epoch(e)
            for i in range(len(train)) if train[i][2] == real}
    assert seen and seen <= set(range(20)) - {9, 19}
    held_out = {int(v - 1500) // 10 for v in val.pairs[val.families.index("Real")].velocity_array[:, 0, 0, 0]}
    assert held_out <= {9, 19}


def test_online_draws_mix_into_files_at_the_configured_share(tmp_path):
    root = write_tree(tmp_path / "tree")  # 12 samples, validated by fold 0
    data = GwiData(source="files", roots=[str(root)], online_fraction=0.25, families=["Style_A"], flip=False)
    train, val = online.build_datasets(data, seed=0)
    files = len(SeismicPairs(find_pairs([root]), ["CurveFault_A", "FlatVel_A"])) - len(val)
    assert len(train) == files + round(files / 3)  # a quarter of the epoch
    batch = online.collate([train[0], train[len(train) - 1]])  # a file sample and a draw
    assert batch[3].tolist() == [False, True]
    prepared = online.OnlineSimulator(1000)(batch, torch.device("cpu"))
    assert torch.equal(prepared[0][0], train[0][0].float())
    assert torch.equal(prepared[0][1], forward_model(batch[1][1:])[0])
    assert batch[2].tolist()[1] == online.NOT_VALIDATED  # Style_A has no validation samples


@pytest.mark.parametrize("changes,message", [
    (["data.online_fraction=0.5"], "data.source=online draws every training sample online"),
    (["data.online_nt=40"], "cannot be resized up to data.time_steps=50"),
])
def test_impossible_online_settings_are_config_errors(tmp_path, changes, message):
    cfg = load_config(SMOKE_GWI, [*ONLINE, f"output_dir={tmp_path}", *changes])
    with pytest.raises(ConfigError, match=message):
        GwiTask(cfg).build_datasets(cfg)


def test_mixing_needs_full_records_and_a_stored_source(tmp_path):
    with pytest.raises(ConfigError, match="must simulate the files' 1000 time samples"):
        online.check_online(GwiData(source="files", online_fraction=0.5, online_nt=100, time_steps=100))
    with pytest.raises(ConfigError, match="synthetic source's surrogate"):
        online.check_online(GwiData(online_fraction=0.5))
    with pytest.raises(UserError, match="data.velocity_roots.*is not a directory"):
        online.build_datasets(online_data(velocity_roots=[str(tmp_path / "nope")]), 0)


# ---- a run ------------------------------------------------------------------------------------------------


def run(run_dir, *extra: str) -> dict:
    return train(load_config(SMOKE_GWI, [*ONLINE, f"output_dir={run_dir}", *extra]))


def killed_run(run_dir) -> None:
    os.environ[ckpt.KILL_AT_ENV] = "last:placed:2"  # the second `last` save: step 4, mid-run
    ckpt._points_reached.clear()
    run(run_dir)


def test_an_online_run_killed_and_resumed_ends_with_the_weights_of_a_straight_run(tmp_path):
    run(tmp_path / "straight")
    child = multiprocessing.get_context("fork").Process(target=killed_run, args=(tmp_path / "killed",))
    child.start()
    child.join(120)
    assert child.exitcode == -signal.SIGKILL
    assert ckpt.read_meta(tmp_path / "killed" / "checkpoints" / "last")["step"] == 4
    summary = run(tmp_path / "killed")
    assert summary["step"] == 8
    for name in ("model.safetensors", ckpt.WEIGHTS):  # raw and EMA weights
        a, b = (load_file(str(tmp_path / d / "checkpoints" / "last" / name)) for d in ("straight", "killed"))
        assert all(torch.equal(a[k], b[k]) for k in a)
    rows = read_metrics(tmp_path / "straight")
    shares = [r["train/simulation_share"] for r in rows if "train/simulation_share" in r]
    assert len(shares) == 4 and all(0 < s < 1 for s in shares)  # every log.every_steps=2 updates
    assert [r["val/mae"] for r in rows if "val/mae" in r] == [r["val/mae"] for r in read_metrics(tmp_path / "killed") if "val/mae" in r]


def test_the_lr_finder_trains_on_simulated_draws_too(tmp_path):
    result = lr_find(load_config(SMOKE_GWI, [*ONLINE, f"output_dir={tmp_path}"]), steps=5, diverge=1e9)
    assert result["steps"] == 5 and all(np.isfinite(result["loss"]))  # the (B, 0) placeholder never reached the model


@pytest.mark.slow
def test_two_processes_train_on_online_draws(tmp_path):
    result = accelerate_launch(2, "train.py", SMOKE_GWI, *ONLINE, "trainer.batch_size=2", f"output_dir={tmp_path}")
    assert result.returncode == 0, result.stderr
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows if "val/mae" in r] == [4, 8]  # 16 draws an epoch over 2 processes x 2
    assert all(0 < r["train/simulation_share"] < 1 for r in rows if "train/simulation_share" in r)
