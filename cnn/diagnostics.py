"""What a classification run shows about its model beyond the loop's own numbers:

- the parameter table (name, layer type, shape, count, trainable, L2 norm at initialisation), printed
  when a run starts and written to `<output_dir>/parameters.csv`;
- per-layer gradient norms `grad_norm/<layer>` (the loop logs only the global `train/grad_norm`),
  written to `<output_dir>/grad_norms.jsonl` and the W&B run.

The task sets both up from `Task.on_train_start`, so the loop (harness/) needs no change.
"""
from __future__ import annotations

import csv
import io
import json
import sys
import weakref
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from harness.errors import is_main_process
from harness.files import write_text_atomic

PARAMETER_COLUMNS = ("name", "layer", "shape", "count", "trainable", "norm")


def parameter_rows(model: nn.Module) -> list[dict]:
    """One row per parameter tensor; `layer` is the type of the module that owns it (Conv2d,
    BatchNorm2d, ...), `norm` its L2 norm."""
    owner = {id(p): type(module).__name__ for module in model.modules() for p in module.parameters(recurse=False)}
    return [dict(name=name, layer=owner[id(param)], shape="x".join(map(str, param.shape)) or "scalar",
                 count=param.numel(), trainable=param.requires_grad, norm=round(float(param.detach().float().norm()), 4))
            for name, param in model.named_parameters()]


def format_parameter_table(rows: list[dict], title: str = "") -> str:
    header = dict(zip(PARAMETER_COLUMNS, PARAMETER_COLUMNS))
    widths = {c: max(len(str(r[c])) for r in [header, *rows]) for c in PARAMETER_COLUMNS}
    lines = [f"parameters of {title}" if title else "parameters"]
    lines += ["  ".join(str(r[c]).ljust(widths[c]) for c in PARAMETER_COLUMNS).rstrip() for r in [header, *rows]]
    total = sum(r["count"] for r in rows)
    trainable = sum(r["count"] for r in rows if r["trainable"])
    lines.append(f"total {total:,} parameters ({trainable:,} trainable) in {len(rows)} tensors")
    return "\n".join(lines)


def parameter_csv(rows: list[dict]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=PARAMETER_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def report_parameters(model: nn.Module, cfg, run_dir: Path) -> Path | None:
    """Write `<run_dir>/parameters.csv` and print the table (unless log.progress=none), on the main
    process, when a training run starts (`Task.on_train_start`) and the run directory has no table
    yet, or the run starts over (resume=never): a resumed run stays quiet."""
    path = Path(run_dir) / "parameters.csv"
    if not is_main_process() or (path.exists() and cfg.resume != "never"):
        return None
    rows = parameter_rows(model)
    if cfg.log.progress != "none":
        print(format_parameter_table(rows, cfg.model.name), flush=True)
    write_text_atomic(path, parameter_csv(rows))
    return path


class LayerGradNorms:
    """grad_norm/<layer>: the L2 norm of the gradient of each module's own parameters (a conv, a
    norm, a linear), before clipping, averaged over `every` updates and logged at the steps the loop
    logs its train values (step % log.every_steps == 0) to `<output_dir>/grad_norms.jsonl` and W&B.

    Two hooks, no loop change:
    - each parameter's post-accumulate-grad hook keeps the squared norm of its gradient as accumulated
      so far, so after an update's last micro-batch it holds that update's gradient;
    - an optimizer step hook (PyTorch's global one, acting only for the optimizer that holds this model's
      parameters) closes the update: per-layer norms go into the running window.
    Under several processes each process would see only its own gradient before the all-reduce, so only
    the main process measures. With trainer.mixed_precision=fp16 the values include the loss scale, and
    an update the grad scaler skips is not counted (bf16 and fp32 are exact)."""

    def __init__(self, model: nn.Module, out_path: Path, every: int, start_step: int = 0):
        self.out_path, self.every, self.step = Path(out_path), every, start_step
        self.current: dict[str, torch.Tensor] = {}  # parameter name -> squared grad norm of this update
        self.layer_of: dict[str, str] = {}
        self.window_sum = defaultdict(float)
        self.window_count = defaultdict(int)
        self.our_optimizers = weakref.WeakKeyDictionary()
        trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        if not trainable:
            raise ValueError("LayerGradNorms: the model has no trainable parameters")
        self.first_param = weakref.ref(trainable[0][1])
        for name, param in trainable:
            self.layer_of[name] = name.rsplit(".", 1)[0] if "." in name else name
            param.register_post_accumulate_grad_hook(self._recorder(name))
        handle = register_optimizer_step_post_hook(self._after_step)
        weakref.finalize(model, handle.remove)  # the global hook lives as long as the model

    def _recorder(self, name: str):
        def record(param: torch.Tensor) -> None:
            self.current[name] = param.grad.detach().float().square().sum()

        return record

    def _owns(self, optimizer) -> bool:
        if optimizer not in self.our_optimizers:
            first = self.first_param()
            self.our_optimizers[optimizer] = first is not None and any(
                p is first for group in optimizer.param_groups for p in group["params"])
        return self.our_optimizers[optimizer]

    def _after_step(self, optimizer, args, kwargs) -> None:
        if not self._owns(optimizer):
            return
        self.step += 1
        squares = defaultdict(list)
        for name, square in self.current.items():
            squares[self.layer_of[name]].append(square)
        self.current = {}  # a skipped (non-finite) batch leaves no stale gradient behind
        for layer, values in squares.items():
            self.window_sum[layer] += torch.stack(values).sum().sqrt()  # a tensor: no device sync here
            self.window_count[layer] += 1
        if self.step % self.every == 0:
            self.flush()

    def flush(self) -> dict[str, float]:
        values = {f"grad_norm/{layer}": float(total) / self.window_count[layer] for layer, total in self.window_sum.items()}
        self.window_sum.clear()
        self.window_count.clear()
        if not values:
            return values
        with open(self.out_path, "a") as out:
            out.write(json.dumps({"step": self.step, **values}) + "\n")
        wandb = sys.modules.get("wandb")  # only if the loop started a W&B run
        if wandb is not None and getattr(wandb, "run", None) is not None:
            wandb.run.log(values, step=self.step)  # the loop logs the same step right after: W&B merges them
        return values


def attach_layer_grad_norms(model: nn.Module, cfg, run_dir: Path, step: int) -> LayerGradNorms | None:
    """Per-layer gradient norms for a training run continuing from update `step` (main process only)."""
    if not is_main_process():
        return None
    return LayerGradNorms(model, Path(run_dir) / "grad_norms.jsonl", cfg.log.every_steps, step)
