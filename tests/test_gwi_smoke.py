"""Fast CPU checks of the gwi task: the synthetic data, InversionNet, the mirror augmentation, the
loss and metrics, and that a tiny model learns."""
from __future__ import annotations

import importlib
import types

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from gwi.data import ArrayPair, SeismicInput, SeismicPairs, flip_decision, mirror, reduce_time, synthetic_samples
from gwi.layout import SOURCE_X
from gwi.models import create_model
from gwi.synthetic import layered_velocity, reflection_seismic
from gwi.task import GwiData, GwiLoss, GwiModel, GwiTask
from harness.task import get_task

pytestmark = pytest.mark.usefixtures("one_thread")


def make_cfg(data=None, model=None, loss=None, seed=0):
    return types.SimpleNamespace(data=data or GwiData(num_train=8, num_val=4, time_steps=64),
                                 model=model or GwiModel(width=0.125), loss=loss or GwiLoss(), seed=seed)


@pytest.fixture(scope="module")
def velocity():
    return layered_velocity(6, np.random.default_rng(0))


def mirror_columns(array: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(array[..., ::-1])


# ---- synthetic data ---------------------------------------------------------------------------------


def test_layered_velocity_shapes_and_range(velocity):
    assert velocity.shape == (6, 1, 70, 70) and velocity.dtype == np.float32
    assert velocity.min() >= 1500 and velocity.max() <= 4500
    for sample in velocity[:, 0]:
        layers = len(np.unique(sample[:, 35]))
        assert 1 <= layers <= 5  # 2-5 layers; clipping at 1500/4500 can merge two
    # the interfaces dip, so the lateral position matters
    assert any(not np.array_equal(sample[:, 0], sample[:, -1]) for sample in velocity[:, 0])


def test_reflection_seismic_shape_and_content(velocity):
    seismic = reflection_seismic(velocity[:2])
    assert seismic.shape == (2, 5, 1000, 70) and seismic.dtype == np.float32
    assert np.isfinite(seismic).all()
    assert 20 < seismic.max() < 60  # the direct wave next to the source, OpenFWI-like scale
    # reflections: energy long after the direct wave has passed the near receivers
    assert np.abs(seismic[:, 2, 400:, 30:40]).max() > 1e-3


def test_reflection_seismic_is_mirror_symmetric(velocity):
    """Mirroring the map's columns gives the same data with reversed source order and reversed receivers."""
    symmetric_sources = tuple(np.linspace(0, 69, 5))  # 0, 17.25, 34.5, 51.75, 69
    seismic = reflection_seismic(velocity, src_x=symmetric_sources)
    of_mirrored_map = reflection_seismic(mirror_columns(velocity), src_x=symmetric_sources)
    np.testing.assert_allclose(of_mirrored_map, seismic[:, ::-1, :, ::-1], atol=1e-4)

    # OpenFWI's sources (0, 17, 34, 52, 69): exact for the outer four; the middle source's mirror is x = 35
    seismic = reflection_seismic(velocity)
    of_mirrored_map = reflection_seismic(mirror_columns(velocity))
    outer = [0, 1, 3, 4]
    np.testing.assert_allclose(of_mirrored_map[:, outer], seismic[:, outer[::-1], :, ::-1], atol=1e-4)
    middle_mirrored = reflection_seismic(velocity, src_x=(69 - SOURCE_X[2],))
    np.testing.assert_allclose(of_mirrored_map[:, 2], middle_mirrored[:, 0, :, ::-1], atol=1e-4)


# ---- model ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("head", ["sigmoid", "clamp"])
@pytest.mark.parametrize("time_steps", [1000, 128])
def test_inversionnet_output_shape_and_range(head, time_steps):
    torch.manual_seed(0)
    model = create_model("inversionnet", width=0.125, head=head).eval()
    with torch.no_grad():
        velocity = model(3 * torch.randn(2, 5, time_steps, 70))  # large inputs push a linear head out of range
    assert velocity.shape == (2, 1, 70, 70)
    assert velocity.min() >= 1500 and velocity.max() <= 4500


def test_create_model_unknown_name():
    with pytest.raises(ValueError, match=r"'unet9000'.*inversionnet"):
        create_model("unet9000")
    with pytest.raises(ValidationError, match="unet9000"):
        GwiModel(name="unet9000")


# ---- data pipeline and augmentation -----------------------------------------------------------------


def test_flip_augmentation_is_deterministic_and_mirrors():
    seismic, velocity = synthetic_samples(8, [0, 0], time_steps=32)
    pairs = [ArrayPair("synthetic", seismic, velocity)]
    first, second = SeismicPairs(pairs, ["synthetic"], flip=True, seed=7), SeismicPairs(pairs, ["synthetic"], flip=True, seed=7)
    first.set_epoch(3)
    second.set_epoch(3)
    for index in range(8):
        for a, b in zip(first[index][:2], second[index][:2]):
            assert torch.equal(a, b)

    decisions = {(epoch, index): flip_decision(7, epoch, index) for epoch in range(4) for index in range(8)}
    assert decisions == {key: flip_decision(7, *key) for key in decisions}  # a function of (seed, epoch, index)
    assert 0 < sum(decisions.values()) < len(decisions)
    assert [decisions[0, i] for i in range(8)] != [decisions[1, i] for i in range(8)]  # varies by epoch

    seismic, velocity = torch.from_numpy(seismic), torch.from_numpy(velocity)
    (epoch, index), flipped = next((key, value) for key, value in decisions.items() if value)
    first.set_epoch(epoch)
    seismic_out, velocity_out, family = first[index]
    assert torch.equal(seismic_out, seismic[index].flip(0).flip(-1))  # sources reversed, receivers reversed
    assert torch.equal(velocity_out, velocity[index].flip(-1)) and family == 0
    assert torch.equal(seismic_out[4, :, 0], seismic[index][0, :, 69])  # source 0's receiver 69 -> source 4's receiver 0
    assert torch.equal(mirror(*mirror(seismic[index], velocity[index]))[0], seismic[index])

    unflipped = SeismicPairs(pairs, ["synthetic"], flip=False)
    unflipped.set_epoch(epoch)
    assert torch.equal(unflipped[index][0], seismic[index])


def test_flipped_sample_matches_the_data_of_the_mirrored_map(velocity):
    """The augmentation is physically right: up to the middle source's one-cell offset, a mirrored
    sample is what the surrogate produces for the mirrored map."""
    prepare = SeismicInput(200, "log_minmax")
    prepared = prepare(torch.from_numpy(reflection_seismic(velocity[:2])))
    of_mirrored_map = prepare(torch.from_numpy(reflection_seismic(mirror_columns(velocity[:2]))))
    for i in range(2):
        flipped, _ = mirror(prepared[i], torch.from_numpy(velocity[i]))
        torch.testing.assert_close(flipped[[0, 1, 3, 4]], of_mirrored_map[i][[0, 1, 3, 4]], atol=1e-4, rtol=0)


@pytest.mark.parametrize("normalize", ["log_minmax", "standardize"])
def test_build_datasets_and_model_input(normalize):
    cfg = make_cfg(data=GwiData(num_train=8, num_val=4, time_steps=64, normalize=normalize))
    task = GwiTask(cfg)
    train, val = task.build_datasets(cfg)
    assert len(train) == 8 and len(val) == 4 and train.flip and not val.flip
    seismic, velocity, family = train[0]
    assert seismic.shape == (5, 64, 70) and seismic.dtype == torch.float32
    assert velocity.shape == (1, 70, 70) and velocity.dtype == torch.float32
    assert not np.array_equal(train.pairs[0].velocity_array[:4], val.pairs[0].velocity_array)  # different seeds per split
    model_input = task.build_model(cfg).prepare(torch.from_numpy(train.pairs[0].seismic_array))
    if normalize == "log_minmax":
        assert -1.1 < model_input.min() and model_input.max() < 1.1
    else:
        torch.testing.assert_close(model_input.flatten(1).mean(1), torch.zeros(8), atol=1e-4, rtol=0)


def test_model_input_reduces_raw_time_axis_by_area():
    raw = torch.arange(1000, dtype=torch.float16).reshape(1, 1, 1000, 1).expand(2, 5, 1000, 70)
    reduced = SeismicInput(100, "standardize")(raw)
    assert reduced.shape == (2, 5, 100, 70) and reduced.dtype == torch.float32
    # area resizing averages each block of 10 samples
    torch.testing.assert_close(reduce_time(raw.float(), 100)[0, 0, :, 0], torch.arange(4.5, 1000, 10))


# ---- task: registration, loss, metrics, learning ----------------------------------------------------


def test_task_is_registered_by_importing_the_package():
    importlib.import_module("gwi")
    task = get_task("gwi", make_cfg())
    assert isinstance(task, GwiTask) and set(task.sections) == {"data", "model", "loss"}


@pytest.mark.parametrize("loss_name", ["l1", "l1_l2", "smooth_l1"])
def test_loss_and_metrics(loss_name):
    task = GwiTask(make_cfg(loss=GwiLoss(name=loss_name)))
    target = torch.full((3, 1, 70, 70), 3000.0)
    predicted = target.clone()
    predicted[..., 0::2] += 300.0  # wrong by 300 m/s on even columns only
    batch = (torch.zeros(3, 5, 64, 70), target, torch.zeros(3, dtype=torch.long))
    metrics = task.metrics(predicted, batch)
    assert set(metrics) >= {"loss", "mae", "mae_odd"} and all(v.shape == (3,) for v in metrics.values())
    torch.testing.assert_close(metrics["mae"], torch.full((3,), 150.0))
    torch.testing.assert_close(metrics["mae_odd"], torch.zeros(3))  # the Kaggle metric ignores even columns
    torch.testing.assert_close(task.loss(predicted, batch), metrics["loss"].mean())
    assert 0 < task.loss(predicted, batch) < 0.06  # on the [0, 1] scale: an L1 of 300/3000/2 = 0.05


def test_a_few_adam_steps_reduce_the_loss():
    torch.manual_seed(0)
    cfg = make_cfg()
    task = GwiTask(cfg)
    train, _ = task.build_datasets(cfg)
    model = task.build_model(cfg).train()
    batch = torch.utils.data.default_collate([train[i] for i in range(8)])
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss = task.loss(task.forward(model, batch), batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
