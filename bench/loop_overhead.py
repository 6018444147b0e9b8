"""What the harness costs over a minimal hand-written PyTorch loop, on CPU.

Both do the same work: build the model and data, train the same model with the same optimizer,
schedule, batch size and number of updates, evaluate once on the validation set, save the weights
once (the end-of-run learning-curve plot, a report rather than part of the loop, is off). They alternate (raw, harness, raw, harness, ...) so both see the same machine state; the
median wall time of each is compared. The last line is `overhead_ratio=<harness / raw>` (target:
1.05 or less).

    python bench/loop_overhead.py [--steps 600] [--repeats 3]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
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


def raw_loop(cfg) -> float:
    """The reference: what one would write by hand for the same job, nothing more."""
    start = time.perf_counter()
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
    return time.perf_counter() - start


def harness_loop(cfg) -> float:
    start = time.perf_counter()
    train(cfg)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    times = {"raw": [], "harness": []}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats + 1):  # the first round warms caches and is not counted
            for name, run in (("raw", raw_loop), ("harness", harness_loop)):
                out = Path(tmp) / f"{name}{repeat}"
                out.mkdir()
                seconds = run(bench_config(args.steps, out))
                if repeat:
                    times[name].append(seconds)
    samples = args.steps * 64
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:8s} median {median:.3f} s over {len(values)} runs ({samples / median:.0f} samples/s); "
              f"all: {', '.join(f'{v:.3f}' for v in values)}")
    print(f"overhead_ratio={statistics.median(times['harness']) / statistics.median(times['raw']):.3f}")


if __name__ == "__main__":
    main()
