"""Online data against a fixed cache of the same size, at equal updates: does drawing fresh velocity
maps every epoch (data.source=online) beat simulating N maps once and reusing them?

Both sides train the same tiny model (configs/smoke/gwi.yaml's InversionNet) from the same
initialisation with the same optimizer, schedule, batch order and number of updates on maps of the
same families drawn by gwi.online.OnlineDraws (flip on, no other augmentation); the only
difference: the online side draws epoch e's maps afresh ((seed, e, index)), the cache side reuses
epoch 0's, simulated once. Simulation runs through gwi.online.OnlineSimulator on the CPU with a
shortened record (--nt time steps) to keep it to minutes. Both are scored on the same fixed
simulated validation set (gwi.online.simulated_validation). The last line is
`mae_ratio=<online val MAE / cache val MAE>` (below 1: online data helps).

    python bench/online_data.py [--samples 16] [--epochs 96] [--batch-size 16] [--nt 100] [--val 64]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from gwi.online import OnlineDraws, OnlineSimulator, collate, online_sources, simulated_validation  # noqa: E402
from harness.config import load_config  # noqa: E402
from harness.task import get_task  # noqa: E402


def evaluate(task, model, val) -> float:
    model.eval()
    errors = []
    with torch.no_grad():
        for batch in DataLoader(val, batch_size=32):
            errors.append(task.metrics(model(batch[0]), batch)["mae"])
    model.train()
    return float(torch.cat(errors).mean())


def train_side(task, cfg, sources, families, val, fresh: bool, args) -> dict:
    torch.manual_seed(0)  # the same initial weights on both sides
    model = task.build_model(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    batches = args.samples // args.batch_size
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, args.epochs * batches)
    draws = OnlineDraws(sources, args.samples, families, seed=0, augment=[], flip=True)
    simulator, cache = OnlineSimulator(args.nt), {}
    device = torch.device("cpu")
    start, simulated, losses = time.perf_counter(), 0, []
    for epoch in range(args.epochs):
        draws.set_epoch(epoch if fresh else 0)
        order = torch.randperm(args.samples, generator=torch.Generator().manual_seed(epoch)).tolist()
        for b in range(batches):
            indices = order[b * args.batch_size:(b + 1) * args.batch_size]
            if fresh or any(i not in cache for i in indices):
                batch = simulator(collate([draws[i] for i in indices]), device)
                simulated += len(indices)
                if not fresh:
                    cache.update({i: (batch[0][k], batch[1][k]) for k, i in enumerate(indices)})
            else:  # the fixed cache: epoch 0's simulated pairs
                batch = (torch.stack([cache[i][0] for i in indices]), torch.stack([cache[i][1] for i in indices]))
            loss = task.loss(model(batch[0]), batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(float(loss.detach()))
    seconds = time.perf_counter() - start
    return {"val_mae": evaluate(task, model, val), "train_loss": sum(losses[-batches:]) / batches,
            "updates": len(losses), "simulated": simulated, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=16, help="the cache's size = the online draws per epoch")
    parser.add_argument("--epochs", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--nt", type=int, default=100, help="simulated time steps (OpenFWI: 1000)")
    parser.add_argument("--val", type=int, default=64, help="validation maps")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(ROOT / "configs" / "smoke" / "gwi.yaml",
                      ["data.source=online", f"data.online_nt={args.nt}", f"data.time_steps={min(args.nt, 100)}",
                       "data.families=[FlatVel_A,CurveVel_A]"])
    task = get_task(cfg.task, cfg)
    sources = online_sources(cfg.data)
    families = [source.name for source in sources]
    val = simulated_validation(sources, families, args.val, seed=0, nt=args.nt)
    results = {}
    for name, fresh in (("cache", False), ("online", True)):
        results[name] = r = train_side(task, cfg, sources, families, val, fresh, args)
        print(f"{name:6s} val MAE {r['val_mae']:7.1f} m/s  last-epoch train loss {r['train_loss']:.4f}  {r['updates']} updates, "
              f"{r['simulated']} maps simulated, {r['seconds']:.0f} s", flush=True)
    print(f"samples={args.samples} epochs={args.epochs} batch={args.batch_size} nt={args.nt} val={args.val}")
    print(f"mae_ratio={results['online']['val_mae'] / results['cache']['val_mae']:.3f}")


if __name__ == "__main__":
    main()
