"""Speed of `gwi.physics.forward_model` on this CPU against a straightforward implementation of the
same scheme.

Ours: a batch of 8 velocity maps, OpenFWI's default settings (5 sources, 1001 steps, 1000 samples,
310 x 310 padded grid), best of --repeats runs. The reference (written here): the published update
with torch.nn.functional.conv2d for the Laplacian on a circularly padded field, one sample at a
time (its 5 sources as conv2d's batch), float32, out of place. It is too slow to run in full, so
it runs the first --ref-steps steps of one sample and its time is scaled linearly to 1001 steps
(each of its steps costs the same: it always updates the whole grid). Its records over those steps
are compared with ours for that sample. The last line is `speedup=<reference s per sample / ours>`.

    python bench/forward.py [--repeats 3] [--ref-steps 100] [--check-ranges]

--check-ranges: simulate a few real OpenFWI maps per family (when ../shared/data/openfwi-velocity
exists) and maps of our generators, and print their seismic min / max next to OpenFWI's published
per-family ranges (its dataset_config.json).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from gwi.physics.acoustic import forward_model, ricker  # noqa: E402
from gwi.physics import _ckernel  # noqa: E402
from gwi.physics.velocity import generate  # noqa: E402

REAL = ROOT.parent / "shared" / "data" / "openfwi-velocity"
PUBLISHED = {"FlatVel_A": (-26.95, 52.77), "CurveVel_A": (-27.11, 55.10), "FlatFault_A": (-26.10, 50.86),
             "Style_A": (-24.96, 48.93)}
SOURCES_X, DEPTH, NBC, DX, DT, STEPS = (0, 17, 34, 52, 69), 1, 120, 10.0, 1e-3, 1001


def reference(vel: np.ndarray, steps: int) -> np.ndarray:
    """The published scheme, plainly: one (70, 70) map -> records of steps 1..steps, (5, steps, 70)."""
    nz, nx = vel.shape
    v = F.pad(torch.tensor(vel, dtype=torch.float32)[None, None], (NBC,) * 4, mode="replicate")[0, 0]
    a = (NBC - 1) * DX
    kappa = 3.0 * float(vel.min()) * math.log(1e7) / (2.0 * a)
    damp1d = kappa * (torch.arange(NBC, dtype=torch.float32) * DX / a) ** 2
    damp = torch.zeros_like(v)
    damp[:, :NBC], damp[:, NBC + nx:] = damp1d.flip(0), damp1d
    damp[:NBC, NBC:NBC + nx], damp[NBC + nz:, NBC:NBC + nx] = damp1d.flip(0)[:, None], damp1d[:, None]
    alpha, kd = (v * DT / DX) ** 2, damp * DT
    temp1, temp2 = 2 - 5 * alpha - kd, 1 - kd
    kernel = torch.zeros(1, 1, 5, 5)
    kernel[0, 0, 2, [1, 3]] = kernel[0, 0, [1, 3], 2] = 4 / 3
    kernel[0, 0, 2, [0, 4]] = kernel[0, 0, [0, 4], 2] = -1 / 12
    s = torch.zeros(steps)
    w = torch.tensor(ricker(15.0, DT), dtype=torch.float32)
    s[:min(len(w), steps)] = w[:steps]
    sx = torch.tensor(SOURCES_X) + NBC
    sz = DEPTH + NBC
    p0 = torch.zeros(5, 1, *v.shape)
    p1 = torch.zeros_like(p0)
    out = torch.zeros(5, steps, nx)
    for it in range(steps):
        lap = F.conv2d(F.pad(p1, (2, 2, 2, 2), mode="circular"), kernel)
        p = temp1 * p1 - temp2 * p0 + alpha * lap
        p[torch.arange(5), 0, sz, sx] += s[it] * (v[sz, sx] * DT) ** 2
        out[:, it] = p[:, 0, DEPTH + NBC, NBC:NBC + nx]
        p0, p1 = p1, p
    return out.numpy()


class OtherLoad:
    """CPU time other processes used while the block ran, as a fraction of all cores (Linux
    /proc/stat; None elsewhere): the machine is shared, and a busy one slows both sides unevenly."""

    @staticmethod
    def _busy() -> float | None:
        try:
            fields = [float(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        except OSError:
            return None
        return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait

    def __enter__(self):
        self.busy, self.cpu, self.wall = self._busy(), time.process_time(), time.perf_counter()
        return self

    def __exit__(self, *exc):
        busy = self._busy()
        wall = time.perf_counter() - self.wall
        self.fraction = None if busy is None or self.busy is None else max(
            0.0, (busy - self.busy - (time.process_time() - self.cpu)) / (wall * os.cpu_count()))

    def note(self) -> str:
        if self.fraction is None:
            return ""
        return f"  [other processes: {100 * self.fraction:.0f}% of the CPUs" + (", timing pessimistic]" if self.fraction > 0.1 else "]")


def check_ranges(per_family: int) -> None:
    print(f"\nseismic range, {per_family} maps per family, vs OpenFWI's published per-family range:")
    rows = []
    for family in ("FlatVel_A", "CurveVel_A"):
        path = REAL / family / "model" / "model1.npy"
        if path.exists():
            maps = np.load(path, mmap_mode="r")
            pick = np.linspace(0, len(maps) - 1, per_family).astype(int)
            rows.append((f"{family} (real maps)", family, np.asarray(maps[pick], dtype=np.float32)))
    if not rows:
        print(f"  ({REAL} not found: real maps skipped)")
    for family in PUBLISHED:
        rows.append((f"{family} (our generator)", family, generate(family, per_family, 0)))
    for label, family, maps in rows:
        seis = forward_model(torch.from_numpy(maps), batch_size=8)
        low, high = PUBLISHED[family]
        print(f"  {label:28s} min {float(seis.min()):8.2f}  max {float(seis.max()):7.2f}    published {low:7.2f} / {high:6.2f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ref-steps", type=int, default=100, help="steps of the reference actually run (scaled to 1001)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--check-ranges", action="store_true")
    parser.add_argument("--range-maps", type=int, default=16, help="maps per family for --check-ranges")
    args = parser.parse_args()

    family_file = REAL / "CurveVel_A" / "model" / "model1.npy"
    if family_file.exists():
        maps = np.array(np.load(family_file, mmap_mode="r")[:args.batch, 0], dtype=np.float32)
        source = f"real CurveVel_A maps ({family_file})"
    else:
        maps = generate("CurveVel_A", args.batch, 0)[:, 0]
        source = "generated CurveVel_A maps"
    vel = torch.from_numpy(maps)
    backend = "c" if _ckernel.available() else f"torch ({_ckernel.unavailable_reason()})"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores, fast-path backend: {backend}")
    print(f"inputs: {args.batch} {source}")

    forward_model(vel[:1], nt=20)  # warm-up (builds the C kernel once)
    times = []
    with OtherLoad() as load:
        for _ in range(args.repeats):
            start = time.perf_counter()
            ours = forward_model(vel)
            times.append(time.perf_counter() - start)
    per_sample = min(times) / args.batch
    print(f"ours: batch {args.batch}, {STEPS} steps: {min(times):.2f} s (runs: {', '.join(f'{t:.2f}' for t in times)}) "
          f"-> {per_sample:.3f} s/sample, {1 / per_sample:.2f} samples/s{load.note()}")

    steps = min(args.ref_steps, STEPS)
    with OtherLoad() as load:
        start = time.perf_counter()
        ref = reference(maps[0], steps)
        ref_time = time.perf_counter() - start
    ref_per_sample = ref_time * STEPS / steps
    print(f"reference (conv2d, one sample at a time): {steps} steps of 1 sample in {ref_time:.2f} s, "
          f"scaled linearly to {STEPS} steps: {ref_per_sample:.2f} s/sample{load.note()}")
    # Ours records steps 2..1001; the reference's record k is step k+1.
    agree = ours[0].numpy()[:, :steps - 1]
    err = float(np.abs(agree - ref[:, 1:]).max())
    scale = float(np.abs(ref).max())
    print(f"agreement on sample 0 over its first {steps - 1} samples: max |diff| {err:.2e} (peak {scale:.2f}, "
          f"relative {err / scale:.1e})")
    if err > 1e-4 * scale:
        print("ERROR: ours and the reference disagree")
        return 1
    if args.check_ranges:
        check_ranges(args.range_maps)
    print(f"speedup={ref_per_sample / per_sample:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
