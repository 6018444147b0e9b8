"""Speed of `gwi.physics.forward_model` against a straightforward implementation of the same
scheme (the public conv2d port's way), on this CPU or on a CUDA GPU.

CPU (the default): a batch of 8 velocity maps, OpenFWI's default settings (5 sources, 1000 samples,
310 x 310 padded grid), best of --repeats runs. The reference (written here): the published update
with torch.nn.functional.conv2d for the Laplacian on a circularly padded field, indexed as the
public OpenFWI port (tascj/kaggle-waveform-inversion) is (a dummy leading zero in the wavelet,
1001 steps, the first record dropped), one sample at a time (its 5 sources as conv2d's batch),
float32, out of place. It is too slow to run in full, so it runs the first --ref-steps steps of
one sample and its time is scaled linearly to 1001 steps (each of its steps costs the same: it
always updates the whole grid). Its records over those steps are compared with ours for that
sample. The last line is `speedup=<reference s per sample / ours>`.

    python bench/forward.py [--repeats 3] [--ref-steps 100] [--check-ranges]

--check-ranges: simulate a few real OpenFWI maps per family (when ../shared/data/openfwi-velocity
exists) and maps of our generators, and print their seismic min / max next to OpenFWI's published
per-family ranges (its dataset_config.json).

--device cuda: at each batch size of --batches (64-512), samples per minute, peak GPU memory (beyond
the inputs) and the fraction of the bandwidth bound for the fused Triton kernel, the torch-op path on CUDA
(backend="torch") and the reference batched on the GPU as the port runs it, all full length; the
records of the three are compared. The bound: bytes per sample = 15.2 bytes per cell update (12
bytes of fields, p(t-2) and p(t-1) read and p(t) written, plus 16 bytes of coefficients shared by
the 5 sources; gwi/physics/triton_kernel.py) x 310 x 310 cells x 5 sources x 1000 steps = 7.3 GB,
against the device-to-device copy bandwidth measured here (or --bandwidth-gbs, e.g. the data
sheet's). The last line is `fused/port=<fused samples/min / port samples/min>` at the batch size
where each is fastest.

    python bench/forward.py --device cuda [--batches 64,128,256,512] [--bandwidth-gbs 4800]
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
from gwi.physics import _ckernel, triton_kernel  # noqa: E402
from gwi.physics.velocity import generate  # noqa: E402

REAL = ROOT.parent / "shared" / "data" / "openfwi-velocity"
PUBLISHED = {"FlatVel_A": (-26.95, 52.77), "CurveVel_A": (-27.11, 55.10), "FlatFault_A": (-26.10, 50.86),
             "Style_A": (-24.96, 48.93)}
SOURCES_X, DEPTH, NBC, DX, DT = (0, 17, 34, 52, 69), 1, 120, 10.0, 1e-3
PORT_STEPS = 1001  # the port's run: a dummy step, then one per saved sample


def reference(vel: np.ndarray, steps: int, device: str = "cpu") -> torch.Tensor:
    """The published scheme, plainly, indexed as the public port is: maps (B, 70, 70) -> the records
    of steps 1..steps-1 after its dummy step 0, (B, 5, steps - 1, 70), float32 on `device`."""
    B, nz, nx = vel.shape
    v = F.pad(torch.as_tensor(vel, dtype=torch.float32, device=device)[:, None], (NBC,) * 4, mode="replicate")[:, 0]
    a = (NBC - 1) * DX
    kappa = 3.0 * v.amin((1, 2)) * math.log(1e7) / (2.0 * a)
    damp1d = kappa[:, None] * (torch.arange(NBC, dtype=torch.float32, device=device) * DX / a) ** 2
    damp = torch.zeros_like(v)
    damp[:, :, :NBC], damp[:, :, NBC + nx:] = damp1d.flip(1)[:, None], damp1d[:, None]
    damp[:, :NBC, NBC:NBC + nx], damp[:, NBC + nz:, NBC:NBC + nx] = damp1d.flip(1)[:, :, None], damp1d[:, :, None]
    alpha, kd = (v * DT / DX) ** 2, damp * DT
    temp1, temp2, alpha = (2 - 5 * alpha - kd)[:, None], (1 - kd)[:, None], alpha[:, None]
    kernel = torch.zeros(1, 1, 5, 5, device=device)
    kernel[0, 0, 2, [1, 3]] = kernel[0, 0, [1, 3], 2] = 4 / 3
    kernel[0, 0, 2, [0, 4]] = kernel[0, 0, [0, 4], 2] = -1 / 12
    w = torch.tensor(ricker(15.0, DT), dtype=torch.float32)
    s = torch.zeros(steps, device=device)
    s[1:1 + min(len(w), steps - 1)] = w[:steps - 1]  # the port's dummy leading zero
    sx = torch.tensor(SOURCES_X, device=device) + NBC
    sz = DEPTH + NBC
    beta = (v[:, sz, sx] * DT) ** 2  # (B, 5)
    p0 = torch.zeros(B, 5, *v.shape[1:], device=device)
    p1 = torch.zeros_like(p0)
    out = torch.zeros(B, 5, steps, nx, device=device)
    for it in range(steps):
        lap = F.conv2d(F.pad(p1.view(B * 5, 1, *v.shape[1:]), (2, 2, 2, 2), mode="circular"), kernel).view(p1.shape)
        p = temp1 * p1 - temp2 * p0 + alpha * lap
        p[:, torch.arange(5), sz, sx] += beta * s[it]
        out[:, :, it] = p[:, :, DEPTH + NBC, NBC:NBC + nx]
        p0, p1 = p1, p
    return out[:, :, 1:]


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


def load_maps(count: int) -> tuple[np.ndarray, str]:
    """`count` CurveVel_A maps (70, 70) float32: real ones when ../shared has them, else generated."""
    family_file = REAL / "CurveVel_A" / "model" / "model1.npy"
    if family_file.exists():
        maps = np.array(np.load(family_file, mmap_mode="r")[:count, 0], dtype=np.float32)
        return maps, f"real CurveVel_A maps ({family_file})"
    return generate("CurveVel_A", count, 0)[:, 0], "generated CurveVel_A maps"


def cpu_bench(args) -> int:
    maps, source = load_maps(args.batch)
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
    print(f"ours: batch {args.batch}, {ours.shape[2]} samples: {min(times):.2f} s (runs: {', '.join(f'{t:.2f}' for t in times)}) "
          f"-> {per_sample:.3f} s/sample, {1 / per_sample:.2f} samples/s{load.note()}")

    steps = min(args.ref_steps, PORT_STEPS)
    with OtherLoad() as load:
        start = time.perf_counter()
        ref = reference(maps[:1], steps)[0].numpy()
        ref_time = time.perf_counter() - start
    ref_per_sample = ref_time * PORT_STEPS / steps
    print(f"reference (conv2d, one sample at a time): {steps} steps of 1 sample in {ref_time:.2f} s, "
          f"scaled linearly to {PORT_STEPS} steps: {ref_per_sample:.2f} s/sample{load.note()}")
    # Sample k of both is the field after the step that injected wavelet sample k.
    agree = ours[0].numpy()[:, :steps - 1]
    err = float(np.abs(agree - ref).max())
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


def copy_bandwidth(device: torch.device, nbytes: int = 2 << 30) -> float:
    """Device-to-device copy bandwidth, bytes/s (read + write counted), best of 5."""
    a = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    b = torch.empty_like(a)
    best = math.inf
    for _ in range(5):
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        b.copy_(a)
        torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * nbytes / best


def timed(run, device: torch.device, warm_up: bool) -> tuple[float, float, torch.Tensor]:
    """Seconds and peak GiB that run() allocates beyond what was allocated before it (its working
    memory and its result; the inputs and earlier results not counted), after a warm-up call
    (compilation, kernel loading) when `warm_up`."""
    if warm_up:
        run()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    start = time.perf_counter()
    result = run()
    torch.cuda.synchronize(device)
    return time.perf_counter() - start, (torch.cuda.max_memory_allocated(device) - before) / 2**30, result


def cuda_bench(args) -> int:
    if not torch.cuda.is_available():
        print("error: --device cuda: no CUDA device (torch.cuda.is_available() is False)", file=sys.stderr)
        return 2
    missing = triton_kernel.unavailable_reason(torch.device("cuda"))
    if missing:
        print(f"error: --device cuda: the Triton kernel is unavailable ({missing})", file=sys.stderr)
        return 2
    try:
        batches = [int(b) for b in args.batches.split(",")]
    except ValueError:
        batches = []
    if not batches or min(batches) < 1:
        print(f"error: --batches: expected comma-separated positive integers, got {args.batches!r}", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    maps, source = load_maps(max(batches))
    if len(maps) < max(batches):  # fewer real maps than asked for: repeat them
        maps = np.resize(maps, (max(batches), *maps.shape[1:]))
    print(f"torch {torch.__version__}, triton {triton_kernel.triton.__version__}, {torch.cuda.get_device_name(device)}")
    print(f"inputs: {source}")
    bandwidth = args.bandwidth_gbs * 1e9 if args.bandwidth_gbs else copy_bandwidth(device)
    print(f"bandwidth: {bandwidth / 1e9:.0f} GB/s ({'given' if args.bandwidth_gbs else 'measured device-to-device copy'})")
    H = W = 70 + 2 * NBC
    sources, samples = len(SOURCES_X), 1000
    bytes_per_sample = triton_kernel.bytes_per_update(sources) * H * W * sources * samples
    bound = bandwidth / bytes_per_sample * 60
    print(f"bound: {triton_kernel.bytes_per_update(sources):.1f} bytes/update x {H} x {W} x {sources} sources x {samples} steps "
          f"= {bytes_per_sample / 1e9:.2f} GB/sample -> {bound:,.0f} samples/min")
    paths = {
        "fused": lambda v: forward_model(v, backend="triton"),
        "torch-op": lambda v: forward_model(v, backend="torch"),
        "port": lambda v: reference(v, PORT_STEPS, device="cuda"),
    }
    best = {name: 0.0 for name in paths}
    for batch in batches:
        vel = torch.from_numpy(maps[:batch]).to(device)
        results, rates = {}, {}
        for name, run in paths.items():
            # The fused path warms up at every batch size: it is timed on a repeated shape, its graph
            # replayed, as in a generation loop; the others need a warm-up only once.
            seconds, peak, results[name] = timed(lambda: run(vel), device, warm_up=name == "fused" or batch == batches[0])
            rate = rates[name] = batch / seconds * 60
            best[name] = max(best[name], rate)
            print(f"batch {batch:4d}  {name:8s}  {rate:10,.0f} samples/min  peak {peak:6.2f} GiB  "
                  f"{100 * rate / bound:5.1f} % of the bound", flush=True)
        scale = float(results["port"].abs().max())
        for name in ("fused", "torch-op"):
            err = float((results[name] - results["port"]).abs().max())
            print(f"batch {batch:4d}  {name} vs port: max |diff| {err:.2e} (relative {err / scale:.1e})")
            if err > 1e-4 * scale:
                print(f"ERROR: {name} and the port disagree")
                return 1
        print(f"batch {batch:4d}  fused / port: {rates['fused'] / rates['port']:.1f}, fused / torch-op: {rates['fused'] / rates['torch-op']:.1f}")
        del vel, results
    print(f"fused/port={best['fused'] / best['port']:.1f}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--repeats", type=int, default=3, help="CPU: runs of ours, the best is kept")
    parser.add_argument("--ref-steps", type=int, default=100, help=f"CPU: steps of the reference actually run (scaled to {PORT_STEPS})")
    parser.add_argument("--batch", type=int, default=8, help="CPU: maps simulated together")
    parser.add_argument("--check-ranges", action="store_true")
    parser.add_argument("--range-maps", type=int, default=16, help="maps per family for --check-ranges")
    parser.add_argument("--batches", default="64,128,256,512", help="CUDA: batch sizes, comma-separated")
    parser.add_argument("--bandwidth-gbs", type=float, default=None,
                        help="CUDA: memory bandwidth for the bound, GB/s (default: a measured device-to-device copy)")
    args = parser.parse_args()
    return cuda_bench(args) if args.device == "cuda" else cpu_bench(args)


if __name__ == "__main__":
    sys.exit(main())
