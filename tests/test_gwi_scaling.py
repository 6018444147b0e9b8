"""Velocity / time scaling (gwi/scaling.py): data.scale_augment on stored pairs and online draws, the
record of a v made from the record of v, and the "scale" TTA. Tiny arrays, one short simulation, and
three tiny training runs (a stop and resume), and infer.py on the session's smoke run."""
from __future__ import annotations

import signal

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import infer_here
from gwi import online
from gwi.data import ArrayPair, SeismicPairs
from gwi.layout import VELOCITY_MAX, VELOCITY_MIN
from gwi.physics.acoustic import forward_model
from gwi.scaling import SCALE_TTA, WAVELET_PEAK_MS, rescale_time, scale_decision, scaled_record
from gwi.task import GwiTask
from gwi_files import write_test_dir, write_tree
from harness.config import load_config
from harness.errors import ConfigError
from harness.inference import load_ensemble
from harness.loop import train

pytestmark = pytest.mark.usefixtures("one_thread")

SMOKE_GWI = "configs/smoke/gwi.yaml"


def stored_pairs(scale, flip=False, low=1600.0, high=4300.0) -> SeismicPairs:
    """4 samples of random seismic (120 time samples) and maps spanning [low, high] m/s."""
    rng = np.random.default_rng(0)
    seismic = rng.normal(0, 1, (4, 5, 120, 70)).astype(np.float32)
    velocity = rng.uniform(low, high, (4, 1, 70, 70)).astype(np.float32)
    velocity[:, 0, 0, 0], velocity[:, 0, 0, 1] = low, high
    return SeismicPairs([ArrayPair("FlatVel_A", seismic, velocity)], ["FlatVel_A"], flip=flip, seed=3, scale=scale)


def factor(scaled: torch.Tensor, plain: torch.Tensor) -> float:
    ratio = (scaled / plain).flatten()
    assert torch.allclose(ratio, ratio[0], rtol=1e-6)  # one factor for the whole map
    return float(ratio[0])


def test_a_stored_samples_scale_is_a_function_of_seed_epoch_and_index():
    pairs, plain = stored_pairs((0.8, 1.2)), stored_pairs(None)
    pairs.set_epoch(5)
    first, again = pairs[2], pairs[2]
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    a = scale_decision(3, 5, 2, (0.8, 1.2), plain[2][1].numpy())
    assert a != 1 and factor(first[1], plain[2][1]) == pytest.approx(a, rel=1e-6)
    assert torch.equal(first[0], scaled_record(plain[2][0], a))  # the seismic follows the map
    assert not torch.allclose(first[0], plain[2][0])
    rebuilt = stored_pairs((0.8, 1.2))  # a new process (a resume) draws the same factor
    rebuilt.set_epoch(5)
    assert torch.equal(rebuilt[2][1], first[1])
    pairs.set_epoch(6)
    assert factor(pairs[2][1], plain[2][1]) != a
    assert factor(pairs[1][1], plain[1][1]) != a  # another index, another factor
    assert first[0].dtype == plain[2][0].dtype


def test_the_factor_is_narrowed_to_keep_maps_in_the_velocity_range():
    pairs, plain = stored_pairs((0.5, 2.0)), stored_pairs(None)
    factors = []
    for epoch in range(40):
        pairs.set_epoch(epoch)
        for index in range(len(pairs)):
            velocity = pairs[index][1]
            assert VELOCITY_MIN <= float(velocity.min()) and float(velocity.max()) <= VELOCITY_MAX
            factors.append(factor(velocity, plain[index][1]))
    # The map spans [1600, 4300]: a in [1500 / 1600, 4500 / 4300], both ends nearly reached.
    assert 1500 / 1600 - 1e-6 <= min(factors) < 0.95 and 1.04 < max(factors) <= 4500 / 4300 + 1e-6


def test_the_time_stretch_moves_an_impulse_where_it_belongs():
    x = torch.zeros(2, 5, 1000, 70)
    x[..., 500, 3] = 1.0
    assert rescale_time(x, 1.0) is x and scaled_record(x, 1.0) is x
    assert torch.equal(rescale_time(x, 1.0 + 1e-12 - 1e-12), x)
    # out[t] = x[a t]: the impulse at 500 lands at 400 for a = 1.25, at 1000 (outside: gone) for a = 0.5.
    out = rescale_time(x, 1.25)
    assert out[0, 0, 400, 3] == pytest.approx(1.0) and float(out.abs().sum()) == pytest.approx(10.0)
    assert float(rescale_time(x, 0.5)[..., :999, :].abs().sum()) == 0
    # About a pivot: 500 = 2 (t - 100) + 100 -> t = 300.
    assert rescale_time(x, 2.0, pivot=100)[1, 4, 300, 3] == pytest.approx(1.0)
    # Linear interpolation between samples; half precision kept.
    half = rescale_time(x.half(), 1 / 0.8)[0, 0, 399:402, 3]
    assert half.dtype == torch.float16 and torch.allclose(half.float(), torch.tensor([0.0, 1.0, 0.0]), atol=1e-3)


def test_the_scaled_record_is_close_to_the_simulation_of_the_scaled_map():
    rng = np.random.default_rng(1)
    velocity = torch.from_numpy(np.repeat(np.sort(rng.uniform(1800, 3500, 24))[:, None], 24, axis=1)[None].astype(np.float32))
    simulate = lambda v: forward_model(v, nt=400, nbc=40, sources=[(12, 1)])  # noqa: E731
    base = simulate(velocity)
    for a in (0.9, 1.1):
        target = simulate(velocity * a)
        error = lambda x: float((x - target).norm() / target.norm())  # noqa: E731
        shaped = error(scaled_record(base, a))
        assert shaped < 0.05 and error(base) > 0.15
        assert error(rescale_time(base, a, pivot=WAVELET_PEAK_MS)) > 3 * shaped  # the stretch alone: the wavelet is off


class ScaleOracle(torch.nn.Module):
    """Knows the map of one record and the scaled records of each TTA factor: returns a x the map,
    exactly scale-equivariant on them."""

    def __init__(self, seismic, velocity):
        super().__init__()
        self.velocity, self.seen = velocity, []
        self.records = {a: scaled_record(seismic, a) for a in SCALE_TTA}

    def forward(self, batch):
        out = []
        for sample in batch:
            a = next(a for a, record in self.records.items() if torch.equal(record[0], sample))
            self.seen.append(a)
            out.append(self.velocity * a)
        return torch.stack(out)


def test_scale_tta_of_an_exactly_equivariant_model_is_the_plain_prediction():
    rng = np.random.default_rng(0)
    seismic = torch.from_numpy(rng.normal(0, 1, (1, 5, 200, 70)).astype(np.float32))
    velocity = torch.from_numpy(rng.uniform(1500, 4500, (1, 70, 70)).astype(np.float32))
    task = GwiTask(load_config(SMOKE_GWI))
    oracle = ScaleOracle(seismic, velocity)
    task.tta = "none"
    plain = task.predict(oracle, (seismic,))
    task.tta, oracle.seen = "scale", []
    scaled = task.predict(oracle, (seismic,))
    assert sorted(oracle.seen) == sorted(SCALE_TTA)  # one batch holding every factor's record
    assert torch.allclose(scaled, plain, rtol=1e-6)
    assert "scale" in GwiTask.tta_modes and "flip+scale" in GwiTask.tta_modes


def test_online_draws_scale_the_map_before_it_is_simulated():
    sources = [online.GeneratedFamily("FlatVel_A"), online.GeneratedFamily("CurveVel_A")]
    plain = online.OnlineDraws(sources, 8, ["CurveVel_A", "FlatVel_A"], seed=4, augment=["affine"], flip=True)
    scaled = online.OnlineDraws(sources, 8, ["CurveVel_A", "FlatVel_A"], seed=4, augment=["affine"], flip=True,
                                scale=(0.8, 1.2))
    factors = []
    for index in range(8):
        (v, number), (w, same) = plain.draw(index), scaled.draw(index)
        assert same == number
        factors.append(factor(torch.from_numpy(w), torch.from_numpy(v)))
        lo, hi = max(0.8, VELOCITY_MIN / v.min()), min(1.2, VELOCITY_MAX / v.max())
        assert lo - 1e-6 <= factors[-1] <= hi + 1e-6
        assert np.array_equal(scaled.draw(index)[0], w)
    assert len(set(factors)) == 8


@pytest.mark.parametrize("value, message", [
    ("[0.9,1.1]", None),
    ("[1.1,0.9]", "key 'data.scale_augment': [1.1, 0.9] has lo > hi"),
    ("[0,1.2]", "key 'data.scale_augment': factors must be finite and positive"),
    ("[1.1,1.2]", "key 'data.scale_augment': [1.1, 1.2] leaves no factor for a map spanning 1500-4500 m/s"),
])
def test_scale_augment_ranges(value, message):
    overrides = ["data.source=simulated", f"data.scale_augment={value}"]
    if message is None:
        assert load_config(SMOKE_GWI, overrides).data.scale_augment == (0.9, 1.1)
        return
    with pytest.raises(ConfigError) as err:
        load_config(SMOKE_GWI, overrides)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_scale_augment_refuses_the_surrogate_source():
    with pytest.raises(ConfigError, match="key 'data.scale_augment': the synthetic source's surrogate seismic"):
        load_config(SMOKE_GWI, ["data.scale_augment=[0.9,1.1]"])


def test_a_scale_augmented_run_stopped_and_resumed_is_the_straight_run(tmp_path, monkeypatch):
    tree = write_tree(tmp_path / "tree", {"FlatVel_A": ("vel", 4, 2)}, dtype=np.float16)

    def cfg(run, *extra):
        return load_config(SMOKE_GWI, ["data.source=files", f"data.roots=[{tree}]", f"data.val_roots=[{tree}]",
                                       f"output_dir={tmp_path / run}", "trainer.batch_size=2", "trainer.epochs=2",
                                       "sched.name=constant", "trainer.deterministic=true", "log.wandb=disabled",
                                       "log.plot=false", "data.time_steps=64", *extra])

    def weights(run):
        return load_file(str(tmp_path / run / "checkpoints" / "last" / "model.safetensors"))

    scaled = ["data.scale_augment=[0.8,1.2]"]
    assert train(cfg("straight", *scaled))["step"] == 8
    original = GwiTask.after_update

    def stop_after_update_5(self, model, step):
        if step == 4:
            signal.raise_signal(signal.SIGTERM)  # the loop's handler: it stops after the next update
        return original(self, model, step)

    with monkeypatch.context() as patch:
        patch.setattr(GwiTask, "after_update", stop_after_update_5)
        assert train(cfg("resumed", *scaled))["stopped"] == "SIGTERM"
    assert train(cfg("resumed", *scaled))["step"] == 8
    straight, resumed = weights("straight"), weights("resumed")
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    train(cfg("plain"))  # the key changes what is trained on
    plain = weights("plain")
    assert not all(torch.equal(straight[k], plain[k]) for k in straight)


def test_infer_writes_the_scale_tta_submission(tmp_path, gwi_smoke_run, capsys):
    ids = ["a0", "b1"]
    test_dir = write_test_dir(tmp_path / "test", ids)
    for tta in ("scale", "flip+scale"):
        out = tmp_path / f"{tta}.csv"
        result = infer_here(capsys, "--checkpoint", gwi_smoke_run, "--data", test_dir, "--out", out, "--tta", tta,
                            "--num-workers", "0")
        assert result.returncode == 0, result.stderr
        submitted = np.array([line.split(",")[1:] for line in out.read_text().splitlines()[1:]], np.float64).reshape(2, 70, 35)
        task, _, model = load_ensemble([str(gwi_smoke_run)])
        seismic = torch.stack([torch.from_numpy(np.load(test_dir / f"{i}.npy")) for i in ids])
        task.tta = tta
        with torch.no_grad():
            expected = task.predict(model.eval(), (seismic,))[:, 0, :, 1::2].clamp(1500, 4500).numpy()
        np.testing.assert_allclose(submitted, expected, atol=0.051)  # written to 0.1 m/s


@pytest.mark.gpu
def test_scaled_records_and_the_scale_tta_on_cuda_match_the_cpu():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    seismic = torch.from_numpy(np.random.default_rng(2).normal(0, 1, (3, 5, 1000, 70)).astype(np.float32))
    for a in SCALE_TTA:
        cpu, gpu = scaled_record(seismic, a), scaled_record(seismic.cuda(), a)
        assert gpu.device.type == "cuda"
        torch.testing.assert_close(gpu.cpu(), cpu, rtol=0, atol=1e-4 * float(cpu.abs().max()))
    task = GwiTask(load_config(SMOKE_GWI, ["data.source=simulated"]))
    model = task.build_model(task.cfg).eval()
    task.tta = "scale"
    with torch.no_grad():
        cpu, gpu = task.predict(model, (seismic,)), task.predict(model.cuda(), (seismic.cuda(),))
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=0, atol=0.5)  # m/s
