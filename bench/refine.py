"""Cost of one FWI refinement step (`gwi.physics.fwi.refine`: forward, gradient, Adam) per map,
with the adjoint-state gradient against torch's autograd through the simulation.

Each gradient runs in a fresh process (so each peak RSS is its own): `--steps` refinement steps of
`--maps` maps after one untimed warm-up step; per map and step the wall seconds and the process's
CPU seconds (on a busy machine the fairer figure for one thread), and the peak RSS.

    python bench/refine.py [--size small|full] [--maps 1] [--steps 2] [--device cpu]

small: the tests' problem (24 x 24 maps, 3 sources, 320 steps, 8 absorbing cells); full:
OpenFWI's (70 x 70, 5 sources, 1001 steps, 120 cells; a CurveFault_A map). The last lines are
`cpu_speedup=` and `speedup=<autograd wall s per map-step / adjoint's>`.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from gwi.physics.acoustic import forward_model  # noqa: E402
from gwi.physics.fwi import refine  # noqa: E402
from gwi.physics.velocity import generate  # noqa: E402

SMALL = dict(nbc=8, nt=320, freq=20.0, sources=[(2, 1), (12, 1), (21, 1)])


def problem(size: str, maps: int):
    """(start maps, observed seismic, simulator options): the true maps' seismic, started from the
    maps plus a 150 m/s smooth offset."""
    if size == "small":
        true = torch.from_numpy(generate("FlatVel_A", maps, 0))[:, 0, 23:47, 23:47].contiguous()
        simulator = SMALL
    else:
        true = torch.from_numpy(generate("CurveFault_A", maps, 0))[:, 0]
        simulator = {}
    observed = forward_model(true, **simulator)
    return (true + 150.0).clamp(1500, 4500), observed, simulator


def measure(args) -> dict:
    start, observed, simulator = problem(args.size, args.maps)
    kw = dict(gradient=args.gradient, keep_best=False, device=args.device, **simulator)
    refine(start, observed, 1, **kw)  # warm-up (builds the C kernel)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    t, cpu = time.perf_counter(), time.process_time()
    refine(start, observed, args.steps, **kw)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    per = args.steps * args.maps
    return dict(gradient=args.gradient, s_per_map_step=(time.perf_counter() - t) / per,
                cpu_s_per_map_step=(time.process_time() - cpu) / per,
                peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--size", choices=("small", "full"), default="small")
    parser.add_argument("--maps", type=int, default=1)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--gradient", choices=("adjoint", "autograd"), help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    if args.gradient:
        print(json.dumps(measure(args)))
        return
    results = {}
    for gradient in ("adjoint", "autograd"):
        child = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--gradient", gradient], capture_output=True,
                               text=True, check=True)
        results[gradient] = json.loads(child.stdout.strip().splitlines()[-1])
        r = results[gradient]
        print(f"{gradient:9s} {r['s_per_map_step']:.3f} s per map-step (CPU {r['cpu_s_per_map_step']:.3f} s), "
              f"peak RSS {r['peak_rss_mib']:.0f} MiB "
              f"({args.size}, {args.maps} map(s), torch threads {torch.get_num_threads()}, {args.device})")
    print(f"cpu_speedup={results['autograd']['cpu_s_per_map_step'] / results['adjoint']['cpu_s_per_map_step']:.2f}")
    print(f"speedup={results['autograd']['s_per_map_step'] / results['adjoint']['s_per_map_step']:.2f}")


if __name__ == "__main__":
    main()
