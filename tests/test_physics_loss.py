"""The physics-informed loss (loss.physics_weight, gwi/physics_loss.py): its gradient against finite
differences, which samples it uses and when, unlabelled test-layout folders in training, the config
checks, and (slow) that physics-only steps on unlabelled simulated seismic lower its MAE."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from conftest import SMOKE_GWI, read_metrics
from gwi.physics.acoustic import forward_model
from gwi.physics.velocity import generate
from gwi.physics_loss import PhysicsLoss, physics_misfit
from gwi.task import GwiTask, per_sample_loss
from gwi_files import write_test_dir, write_tree
from harness.config import load_config
from harness.errors import ConfigError
from harness.loop import train

pytestmark = pytest.mark.usefixtures("one_thread")

N = 16
TINY = dict(nbc=8, freq=20.0, sources=[(3, 1), (12, 1)])  # forward_model's options for a 16 x 16 grid
TINY_STEPS = 150


def tiny_map(shift: float = 0.0) -> torch.Tensor:
    """(1, 1, N, N) float64: 2000-2150 m/s (growing with depth and x, so one cell holds the minimum,
    which sets the damping) over 2800 m/s below a dipping interface, plus a smooth bump."""
    z, x = torch.meshgrid(torch.arange(N, dtype=torch.float64), torch.arange(N, dtype=torch.float64), indexing="ij")
    v = torch.where(z >= 7 + 0.2 * x, 2800.0, 2000.0 + 10 * z + 5 * x) + 150 * torch.exp(-((z - 5) ** 2 + (x - 8) ** 2) / 8)
    return (v + shift)[None, None]


def test_the_physics_gradient_equals_finite_differences():
    observed = forward_model(tiny_map(), nt=TINY_STEPS, dtype=torch.float64, **TINY)
    v = tiny_map(shift=-60.0).requires_grad_(True)  # a wrong map: the misfit has a gradient
    misfit = physics_misfit(v, observed, TINY_STEPS, **TINY)
    misfit.sum().backward()
    direction = torch.randn(v.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    h = 1e-2  # m/s
    with torch.no_grad():
        plus = physics_misfit(v + h * direction, observed, TINY_STEPS, **TINY)
        minus = physics_misfit(v - h * direction, observed, TINY_STEPS, **TINY)
    numeric = float((plus - minus).sum() / (2 * h))
    analytic = float((v.grad * direction).sum())
    assert abs(analytic) > 1e-6  # a real gradient, not a zero that matches anything
    assert analytic == pytest.approx(numeric, rel=1e-5)
    # The true map explains its own data: zero misfit.
    assert float(physics_misfit(tiny_map(), observed, TINY_STEPS, **TINY)) < 1e-12


def test_the_term_uses_unlabelled_samples_first_and_only_every_nth_update():
    cfg = load_config(SMOKE_GWI, ["data.source=files", "data.roots=[unused]", "loss.physics_weight=0.5", "loss.physics_every=2",
                                  "loss.physics_batch_size=2", "loss.physics_time_steps=30"])
    maps = torch.tensor(generate("FlatVel_A", 3, rng=0), dtype=torch.float32)
    seismic = torch.randn(3, 5, 1000, 70, generator=torch.Generator().manual_seed(0))
    velocity = maps.clone()
    velocity[1:] = torch.nan  # samples 1 and 2 are unlabelled
    predicted = (maps + 100).requires_grad_(True)
    loss = PhysicsLoss(cfg.loss, lambda p, t: per_sample_loss(p, t, cfg.loss))
    batch = (seismic, velocity, torch.zeros(3))

    supervised = per_sample_loss(predicted[:1], maps[:1], cfg.loss).mean().detach()
    expected = supervised + 0.5 * physics_misfit(predicted[1:], seismic[1:], 30).mean().detach()
    assert float(loss(predicted, batch, step=4).detach()) == pytest.approx(float(expected), rel=1e-6)
    assert loss.last_misfit == pytest.approx(float(physics_misfit(predicted[1:], seismic[1:], 30).mean().detach()), rel=1e-6)
    assert float(loss(predicted, batch, step=5).detach()) == pytest.approx(float(supervised), rel=1e-6)  # not this update

    # An all-unlabelled batch on an update without the term: a zero loss that still backpropagates.
    unlabelled = (seismic, torch.full_like(maps, torch.nan), torch.zeros(3))
    out = loss(predicted, unlabelled, step=5)
    out.backward()
    assert float(out.detach()) == 0 and torch.equal(predicted.grad, torch.zeros_like(predicted))


def test_physics_config_mistakes_are_refused(tmp_path):
    tree = write_tree(tmp_path / "tree", {"FlatVel_A": ("vel", 2, 2)})
    with pytest.raises(ConfigError, match="key 'data.unlabelled_roots': unlabelled samples only train through the physics"):
        GwiTask(cfg := load_config(SMOKE_GWI, ["data.source=files", f"data.roots=[{tree}]",
                                               f"data.unlabelled_roots=[{tmp_path}]"])).build_datasets(cfg)
    with pytest.raises(ConfigError, match="key 'loss.physics_weight': data.source=synthetic's seismic is a cheap surrogate"):
        GwiTask(cfg := load_config(SMOKE_GWI, ["loss.physics_weight=1"])).build_datasets(cfg)
    with pytest.raises(ConfigError, match=f"key 'data.unlabelled_roots': '{tmp_path / 'nothing'}' is not a folder of <id>.npy"):
        GwiTask(cfg := load_config(SMOKE_GWI, ["data.source=files", f"data.roots=[{tree}]", "loss.physics_weight=1",
                                               f"data.unlabelled_roots=[{tmp_path / 'nothing'}]"])).build_datasets(cfg)
    with pytest.raises(ConfigError, match="key 'loss.physics_time_steps': 1000 time samples compared, but the online draws "
                                          "simulate data.online_nt=100"):
        GwiTask(cfg := load_config(SMOKE_GWI, ["data.source=online", "loss.physics_weight=1", "data.online_nt=100"])).build_datasets(cfg)


def test_training_with_unlabelled_test_files_logs_the_physics_misfit(tmp_path):
    tree = write_tree(tmp_path / "tree", {"FlatVel_A": ("vel", 4, 2)}, dtype=np.float16)
    test = write_test_dir(tmp_path / "test", [f"t{i}" for i in range(4)])
    cfg = load_config(SMOKE_GWI, [f"output_dir={tmp_path / 'run'}", "data.source=files", f"data.roots=[{tree}]",
                                  f"data.val_roots=[{tree}]", f"data.unlabelled_roots=[{test}]", "loss.physics_weight=0.1",
                                  "loss.physics_batch_size=1", "loss.physics_time_steps=10", "loss.physics_every=2",
                                  "trainer.epochs=1", "trainer.batch_size=4", "log.every_steps=1", "log.wandb=disabled",
                                  "log.plot=false", "data.time_steps=64"])
    task = GwiTask(cfg)
    train_set, _ = task.build_datasets(cfg)
    assert len(train_set) == 8 + 4 and math.isnan(float(train_set[10][1][0, 0, 0])) and train_set[10][0].dtype == torch.float16
    summary = train(cfg)
    assert summary["stopped"] == "finished" and summary["step"] == 3
    misfits = {r["step"]: r["train/physics_misfit"] for r in read_metrics(tmp_path / "run") if "train/physics_misfit" in r}
    assert sorted(misfits) == [1, 3] and all(math.isfinite(m) and m > 0 for m in misfits.values())  # updates 1, 3


@pytest.mark.slow
@pytest.mark.timeout(900)  # four full-grid simulations with their adjoint: over the default 300 s on a busy machine
def test_physics_steps_on_unlabelled_simulated_seismic_lower_its_mae():
    # A tiny model fitted to maps whose shallow rows are 200 m/s too fast (a biased model); then
    # physics-only updates on the same maps' seismic, with no map in the batch. The first 300 time
    # samples see the shallow part, which is where the error is.
    cfg = load_config(SMOKE_GWI, ["data.source=files", "data.roots=[unused]", "loss.physics_weight=1",
                                  "loss.physics_time_steps=300"])
    torch.manual_seed(0)
    maps = torch.tensor(generate("FlatVel_A", 2, rng=1), dtype=torch.float32)
    seismic = forward_model(maps)
    task = GwiTask(cfg)
    model = task.build_model(cfg)
    biased = maps.clone()
    biased[:, :, :25] += 200
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(200):
        loss = per_sample_loss(model(seismic), biased, cfg.loss).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    def mae() -> float:
        with torch.no_grad():
            return float((model(seismic) - maps).abs().mean())

    before = mae()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    unlabelled = (seismic, torch.full_like(maps, torch.nan), torch.zeros(2))
    misfits = []
    for _ in range(4):
        loss = task.loss(model(seismic), unlabelled)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        misfits.append(float(loss.detach()))
    # Measured: MAE 77.1 -> 71.5 m/s while the misfit fell 0.42 -> 0.36.
    after = mae()
    assert misfits == sorted(misfits, reverse=True) and after < before - 3, (before, after, misfits)
