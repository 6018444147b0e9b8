"""The gwi model families and optimizers at CPU scale: the same budget of updates on the same simulated
data (OpenFWI-exact seismic of FlatVel_A and CurveVel_A maps, gwi/simulated.py, made once into
data/simulated/) for inversionnet, caformer_unet, vit_tiled and vit_per_source at tiny widths, each
with each optimizer, through the real loop (train.py's: batch 4, cosine schedule with a short
warm-up, one lr per optimizer for every model, no EMA, no flip). Prints one line per run (parameters,
wall seconds, final val/mae) and last `<optimizer 2>/<optimizer 1>=`, the geometric mean over the
models of the ratio of their val MAEs (below 1: the second optimizer did better), or, with one
optimizer, `best/inversionnet=`. A few hundred updates on a hundred samples rank what learns
fastest from little, not what wins on real data with a GPU.

    python bench/gwi_models.py [--steps 80] [--optimizers adamw muon] [--models inversionnet vit_tiled ...]
"""
from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import torch
from accelerate.state import AcceleratorState, GradientState

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from harness.config import load_config  # noqa: E402
from harness.loop import train  # noqa: E402

# The data and loop every run shares: simulated (cached after the first use), 128 training and 32
# validation maps, time reduced to 256 samples, one evaluation at the end.
COMMON = ["task=gwi", "data.source=simulated", "data.families=[FlatVel_A, CurveVel_A]", "data.num_train=128", "data.num_val=32",
          "data.num_test=0", f"data.cache_dir={ROOT / 'data' / 'simulated'}", "data.time_steps=256", "data.flip=false",
          "trainer.batch_size=4", "trainer.grad_clip=1.0", "trainer.eval_every_epochs=0", "sched.name=cosine",
          "sched.warmup_steps=5", "ema.enabled=false", "checkpoint.monitor=val/mae", "checkpoint.keep_top_k=1", "optim.weight_decay=1e-2",
          "log.wandb=disabled", "log.plot=false", "log.progress=none", "log.every_steps=1000"]
# Tiny widths: InversionNet at a quarter, the UNet decoders at a quarter, the ViT layouts on EVA-02
# tiny (5.5 M, 12 blocks of 192) at a 112 x 112 image (8 x 8 tokens).
MODELS = {
    "inversionnet": ["model.name=inversionnet", "model.width=0.25"],
    "caformer_unet": ["model.name=caformer_unet", "model.width=0.25"],
    "vit_tiled": ["model.name=vit_tiled", "model.encoder=eva02_tiny_patch14_224", "model.side=112", "model.decoder_channels=[96, 96]"],
    "vit_per_source": ["model.name=vit_per_source", "model.encoder=eva02_tiny_patch14_224", "model.side=112", "model.shared_blocks=4"],
}
# One lr for every model and both optimizers: timm's Muon scales its orthogonalised update to AdamW's
# RMS (its default adjust_lr_fn, match_rms_adamw), so AdamW's lr is its lr too.
LR = {"adamw": 1e-3, "muon": 1e-3}


def run(model: str, optimizer: str, steps: int, lr: float, workdir: Path) -> dict:
    AcceleratorState._reset_state(True)  # one Accelerate state per run, as a fresh process would have
    GradientState._reset_state()
    cfg = load_config(None, [*COMMON, *MODELS[model], f"optim.name={optimizer}", f"optim.lr={lr}", f"trainer.max_steps={steps}",
                             f"output_dir={workdir / f'{model}-{optimizer}'}"])
    start = time.perf_counter()
    summary = train(cfg)
    return {"seconds": time.perf_counter() - start, "mae": summary["best"]["val/mae"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=80, help="optimizer updates per run")
    parser.add_argument("--optimizers", nargs="+", default=["adamw", "muon"])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--lr", nargs="+", type=float, help="one per optimizer (default: " +
                        ", ".join(f"{name} {lr}" for name, lr in LR.items()) + ")")
    args = parser.parse_args()
    lrs = args.lr or [LR[name] for name in args.optimizers]
    results = {}
    with tempfile.TemporaryDirectory() as workdir:
        for model in args.models:
            for optimizer, lr in zip(args.optimizers, lrs):
                result = results[model, optimizer] = run(model, optimizer, args.steps, lr, Path(workdir))
                print(f"model={model:15s} optim={optimizer:6s} lr={lr:g} updates={args.steps} "
                      f"seconds={result['seconds']:.1f} val_mae={result['mae']:.1f}", flush=True)
    if len(args.optimizers) > 1:
        first, second = args.optimizers[:2]
        logs = [math.log(results[m, second]["mae"] / results[m, first]["mae"]) for m in args.models]
        print(f"{second}/{first}={math.exp(sum(logs) / len(logs)):.3f}")
    else:
        maes = {m: results[m, args.optimizers[0]]["mae"] for m in args.models}
        print(f"best/inversionnet={min(maes.values()) / maes.get('inversionnet', min(maes.values())):.3f}")


if __name__ == "__main__":
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    main()
