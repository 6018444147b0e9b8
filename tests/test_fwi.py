"""gwi.physics.fwi: the physics misfit of predicted maps and their refinement by full-waveform
inversion, and infer.py's --physics-misfit / --refine-steps end to end.

The physics tests use small simulated problems (24 x 24 maps, 3 sources, 320 steps, 8 absorbing
cells: ~0.2 s per refinement step for two maps) whose observed data the simulator made from known
maps, so misfits and errors have true values to compare with. The infer.py tests need OpenFWI's
full-size files (5 x 1000 x 70); there only one refinement step of one map is run (~15-30 s on
2 shared cores)."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import clean_env, run_entry
from gwi.physics.acoustic import forward_model
from gwi.physics.fwi import refine, seismic_misfit, total_variation
from gwi.physics.velocity import generate
from harness.inference import load_ensemble

pytestmark = pytest.mark.usefixtures("one_thread")

N = 24
SIM = dict(nbc=8, nt=320, freq=20.0, sources=[(2, 1), (12, 1), (21, 1)], checkpoint_steps=None)
SIM_MISFIT = {k: v for k, v in SIM.items() if k != "checkpoint_steps"}  # forward_model's options only


def layered_maps(count: int, seed: int = 0) -> torch.Tensor:
    """(count, N, N) float32 maps: 1800 m/s over three layers (2300, 2900, 3500) whose interfaces
    undulate by +-1.5 cells."""
    rng = np.random.default_rng(seed)
    z, x = np.arange(N)[:, None], np.arange(N)[None]
    maps = []
    for _ in range(count):
        v = np.full((N, N), 1800.0)
        for depth, value in zip((5, 11, 17), (2300.0, 2900.0, 3500.0)):
            v = np.where(z >= depth + 1.5 * np.sin(x / 5 + rng.uniform(0, 3)), value, v)
        maps.append(v)
    return torch.tensor(np.stack(maps), dtype=torch.float32)


def blur(maps: torch.Tensor) -> torch.Tensor:
    """3 x 3 box filter with replicated edges: interfaces smeared over three cells, as a network's are."""
    padded = F.pad(maps[:, None], (1, 1, 1, 1), mode="replicate")
    return F.conv2d(padded, torch.full((1, 1, 3, 3), 1 / 9))[:, 0]


def smooth_bump(amplitude: float) -> torch.Tensor:
    """A Gaussian anomaly of `amplitude` m/s in the upper middle of the map, (1, N, N)."""
    z, x = torch.meshgrid(torch.arange(N, dtype=torch.float32), torch.arange(N, dtype=torch.float32), indexing="ij")
    return amplitude * torch.exp(-((z - 8) ** 2 + (x - 12) ** 2) / (2 * 3.0 ** 2))[None]


def mae(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).abs().flatten(1).mean(dim=1)


@pytest.fixture(scope="module")
def problem():
    """(true maps (2, N, N), their simulated seismic (2, 3, 320, N))."""
    true = layered_maps(2)
    return true, forward_model(true, **SIM_MISFIT)


# ---- the misfit -----------------------------------------------------------------------------------------


def test_misfit_is_zero_for_the_true_map_and_grows_with_the_perturbation(problem):
    true, observed = problem
    assert torch.equal(seismic_misfit(true, observed, **SIM_MISFIT), torch.zeros(2, dtype=torch.float64))
    misfits = [seismic_misfit(true + smooth_bump(a), observed, **SIM_MISFIT) for a in (25, 50, 100, 200)]
    for smaller, larger in zip(misfits, misfits[1:]):
        assert torch.all(larger > 1.5 * smaller)  # ~linear in the amplitude while it is small
    assert torch.all(misfits[0] > 1e-3) and torch.all(misfits[-1] < 1)

    # The definition, by hand in float64; numpy in, numpy out; (B, 1, nz, nx) maps; one map at a time.
    perturbed = (true + smooth_bump(100)).numpy()
    simulated = forward_model(perturbed, **SIM_MISFIT).astype(np.float64)
    expected = np.linalg.norm((simulated - observed.numpy()).reshape(2, -1), axis=1) / \
        np.linalg.norm(observed.numpy().reshape(2, -1).astype(np.float64), axis=1)
    got = seismic_misfit(perturbed[:, None], observed.numpy(), batch_size=1, **SIM_MISFIT)
    assert isinstance(got, np.ndarray)
    np.testing.assert_allclose(got, expected, rtol=1e-8)  # float64 sums in another order
    np.testing.assert_allclose(got, misfits[2].numpy(), rtol=1e-12)


def test_misfit_refuses_data_that_does_not_fit(problem):
    true, observed = problem
    with pytest.raises(ValueError, match=r"observed: shape \(2, 3, 319, 24\), expected \(2, 3, 320, 24\)"):
        seismic_misfit(true, observed[:, :, 1:], **SIM_MISFIT)
    with pytest.raises(ValueError, match=r"observed: shape \(2, 3, 320, 24\), expected \(1, 3, 320, 24\)"):
        seismic_misfit(true[:1], observed, **SIM_MISFIT)
    with pytest.raises(ValueError, match=r"observed: samples \[1\] are all zeros"):
        seismic_misfit(true, torch.stack([observed[0], torch.zeros_like(observed[1])]), **SIM_MISFIT)
    with pytest.raises(ValueError, match=r"velocity: expected \(B, nz, nx\)"):
        seismic_misfit(true[:, None, None], observed, **SIM_MISFIT)


# ---- refinement -------------------------------------------------------------------------------------------


def test_refinement_lowers_the_error_of_a_blurred_noisy_prediction(problem):
    """A network-like prediction (interfaces smeared over 3 cells, 10 m/s noise; MAE ~55 m/s):
    20 steps with TV lower the MAE by a third or more (measured 55 -> 33-36 m/s) and the misfit
    5x (0.044-0.053 -> 0.008)."""
    true, observed = problem
    start = (blur(true) + 10 * torch.randn(true.shape, generator=torch.Generator().manual_seed(1))).clamp(1500, 4500)
    refined = refine(start, observed, 20, tv_weight=1.0, **SIM)
    before, after = mae(start, true), mae(refined, true)
    assert torch.all(before > 50)
    assert torch.all(after < 0.75 * before), (before, after)
    misfit_before, misfit_after = (seismic_misfit(v, observed, **SIM_MISFIT) for v in (start, refined))
    assert torch.all(misfit_after < misfit_before / 3), (misfit_before, misfit_after)


def test_refinement_respects_the_bounds_and_keeps_the_best_iterate(problem):
    """A start partly outside [1500, 4500] and a step of 300 m/s: Adam's first step moves every
    cell by lr (in [0, 1] units; a little less where the gradient is not far above Adam's eps) up
    or down, and the projection stops the cells it would carry across a bound exactly there. Steps
    far too large make the misfit worse than the start's: keep_best returns the start itself
    (clamped), keep_best=False the worse last iterate."""
    true, _ = problem
    true = true.clone()
    true[:, -4:] = 4500.0  # the deepest layer on the upper bound
    observed = forward_model(true, **SIM_MISFIT)
    start = true.clone()
    start[:, :4] = 1400.0  # below the bound: clamped before the first step
    start[:, -4:] = 4450.0
    clamped = start.clamp(1500, 4500)
    last = refine(start, observed, 1, lr=0.1, keep_best=False, **SIM)
    assert last.min() == 1500 and last.max() == 4500
    step = (last - clamped).abs()
    at_bound = (last == 1500) | (last == 4500)
    assert torch.all(at_bound | ((step > 250) & (step < 300.01)) | (step < 1e-3))
    assert step[~at_bound].median() > 299.9
    assert ((last == 1500) & (clamped == 1500)).sum() > 20  # pushed down from the lower bound: stayed on it
    assert ((last == 4500) & (clamped == 4450)).sum() > 20  # 50 m/s up, then the bound
    # Steps of 1500 m/s only make things worse: keep_best falls back to the start.
    worse = refine(start, observed, 2, lr=0.5, keep_best=False, **SIM)
    best = refine(start, observed, 2, lr=0.5, **SIM)
    assert torch.equal(best, clamped)
    assert torch.all(seismic_misfit(worse, observed, **SIM_MISFIT) > seismic_misfit(best, observed, **SIM_MISFIT))


def test_total_variation_and_its_weight(problem):
    """TV of a map split into a 1500 and a 4500 m/s half is one unit jump per row: 1 / (nx - 1).
    From a noisy start (40 m/s white noise), a TV weight makes refinement smooth the map: the
    larger the weight, the lower its TV (measured after 4 steps: 0.057, 0.047, 0.041 for weights
    0, 0.1, 1; the start's 0.057), and here the lower its error too (MAE 33 -> 19 m/s)."""
    split = torch.full((1, 6, 5), 1500.0)
    split[..., 3:] = 4500.0
    assert total_variation(split).item() == pytest.approx(1 / 4)
    assert total_variation(split.transpose(1, 2)).item() == pytest.approx(1 / 4)

    true, observed = problem
    start = true + 40 * torch.randn(true.shape, generator=torch.Generator().manual_seed(2))
    refined = {weight: refine(start, observed, 4, tv_weight=weight, **SIM) for weight in (0.0, 0.1, 1.0)}
    tv = {weight: total_variation(maps) for weight, maps in refined.items()}
    start_tv = total_variation(start)
    assert torch.all(tv[0.1] < 0.9 * tv[0.0]) and torch.all(tv[1.0] < 0.95 * tv[0.1]), tv
    assert torch.all(tv[0.0] > 0.95 * start_tv) and torch.all(tv[1.0] < 0.8 * start_tv), (start_tv, tv)
    assert torch.all(mae(refined[1.0], true) < 0.75 * mae(refined[0.0], true))


def test_refinement_is_per_sample_whatever_the_batching_and_checkpointing(problem):
    """Samples are independent: one at a time, with recomputation in blocks of 7 steps, gives the
    same maps as both together storing every step. Also inside no_grad. The adjoint-state gradient
    (the default) and autograd's give the same maps."""
    true, observed = problem
    start = true + smooth_bump(150)
    together = refine(start, observed, 2, tv_weight=0.5, **SIM)
    with torch.no_grad():  # as infer.py calls it: refine turns gradients on itself
        apart = refine(start[:, None], observed, 2, tv_weight=0.5, batch_size=1, **{**SIM, "checkpoint_steps": 7})
    assert apart.shape == (2, 1, N, N)
    torch.testing.assert_close(apart[:, 0], together, rtol=0, atol=1e-3)
    assert mae(together, start).min() > 1  # it moved
    # Adam divides by each cell's gradient size, so the two gradients' float32 rounding (~1e-5
    # relative) moves a few cells whose gradient is tiny by up to 0.005 m/s.
    autograd = refine(start, observed, 2, tv_weight=0.5, gradient="autograd", **SIM)
    torch.testing.assert_close(autograd, together, rtol=0, atol=0.02)
    assert (autograd - together).abs().gt(1e-3).float().mean() < 0.05
    with pytest.raises(ValueError, match="gradient must be autograd or adjoint, got 'exact'"):
        refine(start, observed, 1, gradient="exact", **SIM)


# ---- infer.py -----------------------------------------------------------------------------------------------


def network_prediction(run, seismic: np.ndarray) -> torch.Tensor:
    task, _, model = load_ensemble([str(run)])
    with torch.no_grad():
        return task.predict(model.eval(), (torch.from_numpy(seismic),))


def test_infer_physics_misfit_on_a_test_folder(tmp_path, gwi_smoke_run):
    """Two full-size test files simulated from OpenFWI-like maps: the reported misfits (mean in the
    JSON, per file in <out>_physics.csv) are those of the network's maps against the files."""
    maps = generate("FlatVel_A", 2, 0)
    seismic = forward_model(maps)
    ids = ["a17", "b42"]
    test_dir = tmp_path / "test"
    test_dir.mkdir()
    for file_id, sample in zip(ids, seismic):
        np.save(test_dir / f"{file_id}.npy", sample)
    out = tmp_path / "submission.csv"
    result = run_entry("infer.py", "--checkpoint", gwi_smoke_run, "--data", test_dir, "--out", out, "--physics-misfit",
                       "--num-workers", "0")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    expected = seismic_misfit(network_prediction(gwi_smoke_run, seismic), seismic).numpy()
    assert report["misfit"] == pytest.approx(expected.mean(), rel=1e-5)
    assert report["physics_csv"] == str(tmp_path / "submission_physics.csv") and "refine" not in report
    with open(report["physics_csv"]) as handle:
        rows = list(csv.DictReader(handle))
    assert [row["id"] for row in rows] == ids
    np.testing.assert_allclose([float(row["misfit"]) for row in rows], expected, rtol=1e-5)
    assert 0.05 < expected.min() and expected.max() < 2  # a barely trained network: far from the data, not absurd


@pytest.mark.slow  # a full-size gradient on a CPU: ~30 s (make test-all runs it)
def test_infer_refines_a_labelled_folder(tmp_path, gwi_smoke_run):
    """One refinement step of one full-size map: the refined map is the one scored and saved; the
    misfit and MAE before and after are those of the network's and the saved maps; Adam's first
    step moves every cell by lr (15 m/s) or not at all."""
    velocity = generate("CurveVel_A", 1, 3)
    seismic = forward_model(velocity)
    for kind, array in (("data", seismic), ("model", velocity)):
        (tmp_path / "labelled" / "CurveVel_A" / kind).mkdir(parents=True, exist_ok=True)
        np.save(tmp_path / "labelled" / "CurveVel_A" / kind / f"{kind}1.npy", array)
    saved, table = tmp_path / "refined.npy", tmp_path / "physics.csv"
    # One thread: the autograd path's many small ops slow down many times over when two OpenMP
    # threads compete with other work for two cores.
    result = run_entry("infer.py", "--checkpoint", gwi_smoke_run, "--data", tmp_path / "labelled", "--refine-steps", "1",
                       "--save-predictions", saved, "--physics-csv", table, "--num-workers", "0",
                       env=clean_env(OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    refined, network = torch.from_numpy(np.load(saved)), network_prediction(gwi_smoke_run, seismic)
    truth = torch.from_numpy(velocity)
    assert report["refine"] == {"steps": 1, "tv_weight": 1.0, "lr": 0.005}
    assert report["mae"] == pytest.approx(mae(refined, truth).item(), rel=1e-5)
    assert report["mae_before_refine"] == pytest.approx(mae(network, truth).item(), rel=1e-5)
    assert report["misfit"] == pytest.approx(seismic_misfit(refined, seismic).item(), rel=1e-5)
    assert report["misfit_before_refine"] == pytest.approx(seismic_misfit(network, seismic).item(), rel=1e-5)
    assert report["misfit"] < report["misfit_before_refine"]
    step = (refined - network.clamp(1500, 4500)).abs()
    moved = step[step > 1e-2]
    assert len(moved) > 0.9 * step.numel() and moved.max() < 15.01 and moved.median() > 14.9
    with open(table) as handle:
        (row,) = csv.DictReader(handle)
    assert row["id"] == "CurveVel_A/data1:0"
    assert float(row["misfit_before_refine"]) == pytest.approx(report["misfit_before_refine"], rel=1e-5)


def test_infer_refuses_physics_flags_that_would_do_nothing(tmp_path, capsys):
    import infer

    assert infer.main(["--checkpoint", str(tmp_path), "--refine-tv", "1.0", "--physics-misfit", "--data", str(tmp_path)]) == 2
    assert "--refine-tv / --refine-lr: they only act with --refine-steps N" in capsys.readouterr().err
    assert infer.main(["--checkpoint", str(tmp_path), "--physics-misfit"]) == 2
    assert "give --data" in capsys.readouterr().err
    for flag, value, message in (("--refine-steps", "-1", "expected a value >= 0, got -1"),
                                 ("--refine-lr", "0", "expected a value > 0, got 0"),
                                 ("--refine-tv", "nan", "expected a value >= 0, got nan")):
        with pytest.raises(SystemExit) as exit_info:
            infer.main(["--checkpoint", str(tmp_path), "--data", str(tmp_path), flag, value])
        assert exit_info.value.code == 2 and f"argument {flag}: {message}" in capsys.readouterr().err
