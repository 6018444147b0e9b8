"""What the harness costs over a minimal hand-written PyTorch loop, on CPU.

Both do the same work: build the model and data, train the same model with the same optimizer,
schedule, batch size and number of updates, evaluate once on the validation set, save the weights
once (the end-of-run learning-curve plot, a report rather than part of the loop, is off).

Made to hold on a shared, busy machine, where other processes only ever add time: many short runs,
interleaved in pairs whose order flips each time (raw, harness, harness, raw, ...) so a drift in the
load hits both sides alike, and each side's minimum over the repeats is compared, the run least
disturbed (a median still moves with the load). Each run reports its wall time and its process CPU
time (time.process_time, all threads of this process, plus any waited-for child processes: with
trainer.num_workers=0 there are none); CPU time does not count the time the process waited for a
core, but does count OpenMP threads spinning while they wait for each other, hence one torch thread
by default.

The harness's extra work is CPU work (no subprocess, no fsync: checkpoints go to the page cache),
so the figure is the CPU-time one; wall time adds the time spent waiting for a core, which on a
busy machine is as large as the effect (the harness came out "faster" than the raw loop). Prints
per side the minimum and median of both, `wall_overhead_ratio=<min harness wall / min raw wall>`,
and last `overhead_ratio=<min harness CPU / min raw CPU>` (target: 1.05 or less).

    python bench/loop_overhead.py [--steps 200] [--repeats 10] [--threads N]
"""
from __future__ import annotations

import argparse
import gc
import resource
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from harness.config import load_config  # noqa: E402
from harness.loop import train  # noqa: E402
from harness.optim import build_optimizer, build_scheduler  # noqa: E402
from harness.task import get_task  # noqa: E402

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "smoke" / "cnn.yaml"


def bench_config(steps: int, out: Path):
    return load_config(CONFIG, [
        f"output_dir={out}", f"trainer.max_steps={steps}", "trainer.batch_size=64", "trainer.eval_every_epochs=0",
        "trainer.eval_batch_size=256", "data.num_train=8192", "data.num_val=512", "data.image_size=16",
        "model.width=16", "log.wandb=disabled", "log.progress=none", "log.every_steps=50", "resume=never",
        "checkpoint.keep_top_k=0", "log.plot=false",
    ])


@dataclass(frozen=True)
class Timing:
    wall: float  # seconds
    cpu: float  # seconds of CPU time of this process (all threads) and its waited-for children


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed(run, cfg) -> Timing:
    """Wall and CPU time of `run(cfg)`; garbage from the previous run is collected first, outside the timing."""
    gc.collect()
    wall, cpu, children = time.perf_counter(), time.process_time(), children_cpu()
    run(cfg)
    return Timing(time.perf_counter() - wall, time.process_time() - cpu + children_cpu() - children)


def raw_loop(cfg) -> None:
    """The reference: what one would write by hand for the same job, nothing more."""
    torch.manual_seed(cfg.seed)
    task = get_task(cfg.task, cfg)
    train_set, val_set = task.build_datasets(cfg)
    loader = torch.utils.data.DataLoader(train_set, batch_size=cfg.trainer.batch_size, shuffle=True, drop_last=True)
    model = task.build_model(cfg)
    optimizer = build_optimizer(cfg.optim, model)
    scheduler = build_scheduler(cfg.sched, optimizer, cfg.trainer.max_steps, "max")
    step = 0
    model.train()
    while step < cfg.trainer.max_steps:
        for images, labels in loader:
            loss = F.cross_entropy(model(images), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
            if step == cfg.trainer.max_steps:
                break
    model.eval()
    correct = 0
    with torch.no_grad():
        for images, labels in torch.utils.data.DataLoader(val_set, batch_size=cfg.trainer.eval_batch_size):
            correct += (model(images).argmax(1) == labels).sum().item()
    torch.save(model.state_dict(), Path(cfg.output_dir) / "raw.pt")


def harness_loop(cfg) -> None:
    train(cfg)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="optimizer updates per run")
    parser.add_argument("--repeats", type=int, default=10, help="counted runs of each side")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: on a shared machine a second OpenMP thread mostly spins "
                             "waiting for a core, which inflates CPU time and makes wall time depend on the load)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    runs = {"raw": raw_loop, "harness": harness_loop}
    times: dict[str, list[Timing]] = {name: [] for name in runs}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats + 1):  # the first pair warms caches and is not counted
            for name in ("raw", "harness") if repeat % 2 == 0 else ("harness", "raw"):
                out = Path(tmp) / f"{name}{repeat}"
                out.mkdir()
                timing = timed(runs[name], bench_config(args.steps, out))
                if repeat:
                    times[name].append(timing)
    samples = args.steps * 64
    print(f"{args.steps} updates at batch 64, {torch.get_num_threads()} torch threads, {args.repeats} runs a side, interleaved")
    for name, values in times.items():
        wall, cpu = [t.wall for t in values], [t.cpu for t in values]
        print(f"{name:8s} wall min {min(wall):.3f} s ({samples / min(wall):.0f} samples/s), median {statistics.median(wall):.3f}; "
              f"CPU min {min(cpu):.3f} s, median {statistics.median(cpu):.3f}; "
              f"wall all: {', '.join(f'{v:.2f}' for v in wall)}")
    print(f"wall_overhead_ratio={min(t.wall for t in times['harness']) / min(t.wall for t in times['raw']):.3f}")
    print(f"overhead_ratio={min(t.cpu for t in times['harness']) / min(t.cpu for t in times['raw']):.3f}")


if __name__ == "__main__":
    main()
