"""How approximate is the velocity / time scaling? For real OpenFWI maps v and factors a, the
simulator's F(a v) (gwi.physics.forward_model) against approximations made from F(v) alone: F(v)
stretched in time (gwi.scaling.rescale_time: F(v)(a (t - t0) + t0), linear interpolation, zero
outside the 1 s record) about t0 = 0 or about the wavelet's peak (gwi.scaling.WAVELET_PEAK_MS), the
latter also with the best single amplitude factor c (least squares over all maps of one a), and
the offered one, gwi.scaling.scaled_record (the wavelet-shaping filter, then the stretch about 0),
with its best c too (1: none needed).

Printed per a: the relative L2 errors ||approx - F(a v)|| / ||F(a v)|| next to the no-correction
error ||F(v) - F(a v)|| / ||F(a v)|| (how much of the change an approximation explains), the same in
the models' terms (gwi.data.SeismicInput with log_minmax: the signed log, measured from the image
of a zero record; at 1000 and at --time-steps samples), the fitted factors, the share of maps that
a v pushes out of [1500, 4500] m/s, and the CFL number a vmax dt / dx (the scheme's limit printed
above). The last line is `ratio=<mean over a of scaled_record's error / the uncorrected error>`
(raw amplitudes; 0: exact, 1: explains nothing).

    python bench/velocity_scaling.py [--maps 4] [--scales 0.8 0.9 0.95 1.05 1.1 1.2] [--time-steps 200]

Maps: `--maps` evenly spaced maps of ../shared/data/openfwi-velocity/{FlatVel_A,CurveVel_A}/model/model1.npy
(beside the repository root); where a file is missing, the family's generator (gwi.physics.velocity)
instead, and it says so.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from gwi.data import SeismicInput  # noqa: E402
from gwi.layout import TIME_STEPS, VELOCITY_MAX, VELOCITY_MIN  # noqa: E402
from gwi.physics.acoustic import CFL_LIMIT, DEFAULTS, forward_model  # noqa: E402
from gwi.physics.velocity import generate  # noqa: E402
from gwi.scaling import WAVELET_PEAK_MS, rescale_time, scaled_record  # noqa: E402

VELOCITY_DIR = ROOT.parent / "shared" / "data" / "openfwi-velocity"
FAMILIES = ("FlatVel_A", "CurveVel_A")


def load_maps(count: int) -> tuple[np.ndarray, list[str]]:
    maps, notes = [], []
    for family in FAMILIES:
        path = VELOCITY_DIR / family / "model" / "model1.npy"
        if path.is_file():
            array = np.load(path, mmap_mode="r")
            rows = np.linspace(0, len(array) - 1, count).round().astype(int)
            maps.append(np.array(array[rows], dtype=np.float32))
            notes.append(f"{family}: rows {rows.tolist()} of {path}")
        else:
            maps.append(generate(family, count, np.random.default_rng(0)))
            notes.append(f"{family}: {path} not found, {count} maps of gwi.physics.velocity's generator instead")
    return np.concatenate(maps), notes


def relative(approx: torch.Tensor, target: torch.Tensor) -> float:
    return float((approx - target).norm() / target.norm())


def best_amplitude(approx: torch.Tensor, target: torch.Tensor) -> float:
    return float((approx * target).sum() / (approx * approx).sum())


def model_terms(seismic: torch.Tensor, time_steps: int) -> torch.Tensor:
    """The model input of log_minmax, less the image of a zero record (so norms measure the signal)."""
    prepare = SeismicInput(time_steps, "log_minmax")
    return prepare(seismic) - prepare(torch.zeros_like(seismic[:1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--maps", type=int, default=4, help="maps per family")
    parser.add_argument("--scales", type=float, nargs="+", default=[0.8, 0.9, 0.95, 1.05, 1.1, 1.2])
    parser.add_argument("--time-steps", type=int, default=200, help="the model's data.time_steps for the second model-terms column")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    maps, notes = load_maps(args.maps)
    print("\n".join(notes), flush=True)
    velocity = torch.from_numpy(maps)
    dt, dx = DEFAULTS["dt"], DEFAULTS["dx"]
    records = {}
    for a in tqdm([1.0] + args.scales, desc="simulating", unit="factor"):
        records[a] = forward_model(velocity * a)
    base = records[1.0]
    print(f"{len(maps)} maps, {TIME_STEPS} ms records; wavelet peak t0 = {WAVELET_PEAK_MS} ms; CFL limit {CFL_LIMIT:.3f}")
    print("relative L2 error against F(a v); raw amplitudes: no correction, stretched about t = 0, about t0, about t0 with "
          "the best amplitude factor c, shaped + stretched (gwi.scaling.scaled_record) and its best c; model terms "
          f"(log_minmax) at 1000 and {args.time_steps} time samples: no correction, about t0, shaped")
    print("   a |  none   t=0    t0   t0,c    c  shaped   c   | log1000: none    t0  shaped | "
          f"log{args.time_steps}: none    t0  shaped | out of range  CFL")
    ratios = []
    for a in args.scales:
        target = records[a]
        candidates = {"none": base, "zero": rescale_time(base, a), "peak": rescale_time(base, a, pivot=WAVELET_PEAK_MS),
                      "shaped": scaled_record(base, a)}
        raw = {name: relative(x, target) for name, x in candidates.items()}
        c_peak, c_shaped = best_amplitude(candidates["peak"], target), best_amplitude(candidates["shaped"], target)
        ratios.append(raw["shaped"] / raw["none"])
        logs = []
        for steps in (TIME_STEPS, args.time_steps):
            t = model_terms(target, steps)
            logs += [relative(model_terms(candidates[name], steps), t) for name in ("none", "peak", "shaped")]
        vmin, vmax = velocity.flatten(1).amin(1) * a, velocity.flatten(1).amax(1) * a
        out = float(((vmin < VELOCITY_MIN) | (vmax > VELOCITY_MAX)).float().mean())
        print(f"{a:4.2f} | {raw['none']:5.3f} {raw['zero']:5.3f} {raw['peak']:5.3f} "
              f"{relative(c_peak * candidates['peak'], target):5.3f} {c_peak:5.3f} {raw['shaped']:5.3f} {c_shaped:5.3f} |"
              f"         {logs[0]:5.3f} {logs[1]:5.3f} {logs[2]:5.3f} |        {logs[3]:5.3f} {logs[4]:5.3f} {logs[5]:5.3f} "
              f"| {out:5.0%}  {float(vmax.max()) * dt / dx:.3f}", flush=True)
    print(f"ratio={np.mean(ratios):.3f}")


if __name__ == "__main__":
    main()
