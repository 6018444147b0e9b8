"""Look inside a trained classifier.

    python -m cnn.analyze WHAT [WHAT ...] --checkpoint RUN [options] [key=value ...]

WHAT is one or more of (or `all`):
  misclassified     grid of the most confident errors (+ .csv: every error, most confident first)
  confusion         confusion matrix, rows = true class, columns = predicted (+ .csv)
  gradcam           Grad-CAM (captum LayerGradCam) of the predicted class at --layer (default: the last conv
                    whose output is larger than 1 x 1; a 1 x 1 map would make every Grad-CAM map constant)
  guided-backprop   guided backpropagation (captum GuidedBackprop) of the predicted class
  class-model       per class, the image that maximises its logit: gradient ascent from gray with an L2
                    penalty, pixels kept in [0, 1] (Simonyan, Vedaldi & Zisserman 2014)
  local-complexity  per layer, the neurons whose pre-activation sign changes within a cross-polytope of
                    P directions and radius r around each image (Humayun et al. 2024; cnn/complexity.py) (+ .csv)
  weight-noise      accuracy with Gaussian noise (level x the layer's weight std) added to one conv/linear
                    layer at a time, --trials draws per level (+ .csv: layer, level, trial, accuracy)

RUN is a run directory (its best checkpoint) or a checkpoint directory (e.g. RUN/checkpoints/last). The
images are the run's validation data (--split test: the official test split), read as its config says
(key=value changes it, e.g. data.root=/elsewhere). Files go to RUN/analysis/<what>.png (and .csv); the
paths are printed. They are also logged to W&B under analysis/<what>: to the training run itself when
its id is recorded (in RUN/checkpoints/last, or RUN/wandb/), else to a new run NAME-analysis (job_type
analysis) in the same project; --wandb auto follows the run's log.wandb. A mistake (unknown WHAT, no
checkpoint, a bad --layer) stops with exit code 2 and a one-line message.
"""
from __future__ import annotations

import argparse
import csv
import math
import sys
import textwrap
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on rented machines
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from captum.attr import GuidedBackprop, LayerAttribution, LayerGradCam  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402
import wandb  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from cnn.complexity import local_complexity, probe_indices  # noqa: E402
from cnn.data import ImageSet, class_names, collate, dataset_spec, read_split, synthetic_images  # noqa: E402
from cnn.images import FILE_SOURCES  # noqa: E402
from cnn.models import to_unit_float  # noqa: E402
from cnn.plots import confusion_matrix, save_confusion, save_heatmap  # noqa: E402
from harness import checkpoint as ckpt  # noqa: E402
from harness.artifacts import resolve_checkpoint  # noqa: E402
from harness.errors import UserError, print_user_error  # noqa: E402
from harness.inference import load_ensemble  # noqa: E402
from harness.task import get_task  # noqa: E402
from harness.tracking import resolve_wandb_mode, with_offline_fallback  # noqa: E402

ANALYSES = ("misclassified", "confusion", "gradcam", "guided-backprop", "class-model", "local-complexity", "weight-noise")
DEFAULT_SHOWN = 8  # gradcam / guided-backprop: images shown


class Parser(argparse.ArgumentParser):
    """argparse, but a mistake is a UserError (one line, exit 2) rather than usage + message."""

    def error(self, message: str):
        raise UserError(f"{message} (see python -m cnn.analyze --help)")


def build_parser() -> Parser:
    parser = Parser(prog="python -m cnn.analyze", description=__doc__.split("\n\n")[0],
                    usage=__doc__.split("\n\n")[1].strip(), formatter_class=argparse.RawDescriptionHelpFormatter,
                    epilog=__doc__.split("\n\n", 2)[2])
    parser.add_argument("args", nargs="+", metavar="WHAT | key=value", help="analyses to run, then config overrides")
    parser.add_argument("--checkpoint", required=True, help="run directory (its best checkpoint) or checkpoint directory")
    parser.add_argument("--split", choices=["val", "test"], default="val", help="val: the run's validation data; test: the official test split")
    parser.add_argument("--num-samples", type=int, default=None,
                        help="images: evaluated by misclassified/confusion/weight-noise (default: all of the split), shown by "
                             f"gradcam/guided-backprop (default {DEFAULT_SHOWN}), probed by local-complexity (default: the run's "
                             "diagnostics.local_complexity_samples)")
    parser.add_argument("--seed", type=int, default=None, help="picks the images shown/probed and draws directions and noise; default: the run's seed")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the run's trainer.eval_batch_size or batch_size")
    parser.add_argument("--out", default=None, help="folder for the files; default RUN/analysis")
    parser.add_argument("--wandb", choices=["auto", "online", "offline", "disabled"], default="auto",
                        help="auto: as the run's log.wandb")
    parser.add_argument("--top", type=int, default=16, help="misclassified: errors shown")
    parser.add_argument("--layer", default=None, help="gradcam: module name (default: the last Conv2d whose output is larger than 1 x 1)")
    parser.add_argument("--classes", default=None, help="class-model: comma-separated class indices or names (default: all)")
    parser.add_argument("--steps", type=int, default=200, help="class-model: gradient ascent steps")
    parser.add_argument("--lr", type=float, default=0.05, help="class-model: step size (Adam, in pixels)")
    parser.add_argument("--l2", type=float, default=0.01, help="class-model: weight of the L2 penalty on the distance from gray")
    parser.add_argument("--directions", type=int, default=None, help="local-complexity: P (default: the run's diagnostics.local_complexity_directions)")
    parser.add_argument("--radius", type=float, default=None, help="local-complexity: r in pixels (default: the run's diagnostics.local_complexity_radius)")
    parser.add_argument("--noise-levels", default="0,0.05,0.1,0.2,0.5,1", help="weight-noise: comma-separated noise std / layer weight std")
    parser.add_argument("--trials", type=int, default=3, help="weight-noise: noise draws per layer and level")
    return parser


def main(argv: list[str]) -> int:
    try:
        args = build_parser().parse_args(argv)
        whats, overrides = split_positionals(args.args)
        check_numbers(args)
        ctx = load(args, overrides)
        analyses = [prepare(ctx, what) for what in whats]  # every option is checked before any work
        written = []
        for run_analysis in analyses:
            files = run_analysis()
            for path in files:
                print(f"wrote {path}", flush=True)
            written += files
        log_to_wandb(ctx, written)
    except UserError as err:
        return print_user_error(err)
    return 0


def split_positionals(values: list[str]) -> tuple[list[str], list[str]]:
    """(analyses in the order given, `all` expanded, duplicates dropped; key=value overrides)."""
    overrides = [value for value in values if "=" in value]
    whats = []
    for value in (value for value in values if "=" not in value):
        for what in ANALYSES if value == "all" else [value]:
            if what not in ANALYSES:
                raise UserError(f"unknown analysis {what!r}; known: {', '.join(ANALYSES)}, all")
            if what not in whats:
                whats.append(what)
    if not whats:
        raise UserError(f"name at least one analysis: {', '.join(ANALYSES)}, all")
    return whats, overrides


def check_numbers(args) -> None:
    for name in ("num_samples", "batch_size", "top", "steps", "directions", "trials"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    for name in ("lr", "radius"):
        value = getattr(args, name)
        if value is not None and not value > 0:
            raise UserError(f"--{name} must be > 0, got {value}")
    if args.l2 < 0:
        raise UserError(f"--l2 must be >= 0, got {args.l2}")


# ---- the model, the data, the place for the files -------------------------------------------------------


@dataclass
class Context:
    args: argparse.Namespace
    cfg: object  # the run config (from the checkpoint, with the overrides)
    model: nn.Module
    device: torch.device
    checkpoint: Path
    run_dir: Path
    out_dir: Path
    names: list[str]
    seed: int
    batch_size: int
    _split: tuple[torch.Tensor, torch.Tensor] | None = None
    _predictions: dict = field(default_factory=dict)

    def split(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(images (N, C, H, W) float32 in [0, 1], labels (N,)) of --split, on the CPU, read once."""
        if self._split is None:
            self._split = read_images(split_dataset(self.cfg, self.args.split), self.batch_size)
        return self._split

    def evaluated(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The images the evaluating analyses use: the first --num-samples of the split, or all."""
        images, labels = self.split()
        n = self.args.num_samples or len(labels)
        return images[:n], labels[:n]

    def picked(self, default: int) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
        """--num-samples (or `default`) images of the split, chosen by the seed: (images, labels, indices)."""
        images, labels = self.split()
        indices = probe_indices(len(labels), self.args.num_samples or default, self.seed)
        return images[indices], labels[indices], indices

    def probabilities(self) -> torch.Tensor:
        """Softmax of the model on `evaluated()`, (N, classes), computed once."""
        if "probs" not in self._predictions:
            images, _ = self.evaluated()
            self._predictions["probs"] = predict(self.model, images, self.batch_size, self.device).softmax(1)
        return self._predictions["probs"]

    def path(self, name: str) -> Path:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        return self.out_dir / name


def load(args, overrides: list[str]) -> Context:
    local = resolve_checkpoint(args.checkpoint)  # wandb:ENTITY/PROJECT/NAME:ALIAS -> a downloaded folder
    try:
        checkpoint = ckpt.resolve(local)
    except FileNotFoundError as err:
        raise UserError(f"--checkpoint {args.checkpoint}: {err}") from None
    task_name = ckpt.read_meta(checkpoint)["config"].get("task")
    if task_name != "cnn":
        raise UserError(f"--checkpoint {args.checkpoint}: a {task_name!r} run; cnn.analyze analyses classification (cnn) runs")
    # The images are read here on the CPU and moved in batches, so the device loader is off.
    _, cfg, ensemble = load_ensemble([str(checkpoint)], ["data.gpu_loader=false", *overrides])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = ensemble.members[0].to(device).eval()
    # <run>/checkpoints/<name>: the run directory is two levels up; any other checkpoint folder is its own.
    run_dir = checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint
    out_dir = Path(args.out) if args.out else run_dir / "analysis"
    return Context(args=args, cfg=cfg, model=model, device=device, checkpoint=checkpoint, run_dir=run_dir, out_dir=out_dir,
                   names=class_names(cfg.data), seed=cfg.seed if args.seed is None else args.seed,
                   batch_size=args.batch_size or cfg.trainer.eval_batch_size or cfg.trainer.batch_size)


def split_dataset(cfg, split: str) -> Dataset:
    """The run's validation set (exactly what it validated on), or the official test split."""
    if split == "val":
        return get_task("cnn", cfg).build_datasets(cfg)[1]
    dc = cfg.data
    if dc.source == "synthetic":  # a third stream of the same generator: images neither trained nor validated on
        return ImageSet(*synthetic_images(dc.num_val, dc, 3))
    if dc.source in FILE_SOURCES:
        raise UserError(f"--split test: data.source={dc.source} has no test split with labels; use --split val, or score a "
                        "labelled folder with infer.py --data")
    return ImageSet(*read_split(dc.source, dc.root, train=False, download=False))


def read_images(dataset: Dataset, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = [], []
    for x, y in DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate):
        images.append(to_unit_float(x).cpu())
        labels.append(y.cpu())
    return torch.cat(images), torch.cat(labels)


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, batch_size: int, device) -> torch.Tensor:
    """Logits (N, classes) on the CPU, float32, in eval mode."""
    return torch.cat([model(images[i:i + batch_size].to(device)).float().cpu() for i in range(0, len(images), batch_size)])


def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int, device) -> float:
    return float((predict(model, images, batch_size, device).argmax(1) == labels).float().mean())


def prepare(ctx: Context, what: str):
    """Check `what`'s options now (a bad --layer stops before any analysis has run); returns the call."""
    if what == "gradcam":
        layer = gradcam_layer(ctx)
        return lambda: analyze_gradcam(ctx, layer)
    if what == "class-model":
        classes = parse_classes(ctx.args.classes, ctx.names)
        return lambda: analyze_class_model(ctx, classes)
    if what == "local-complexity":
        spec = dataset_spec(ctx.cfg.data)
        dim = spec.channels * spec.image_size ** 2
        if (ctx.args.directions or 0) > dim:
            raise UserError(f"--directions {ctx.args.directions}: at most {dim} orthonormal directions fit in a "
                            f"{spec.channels} x {spec.image_size} x {spec.image_size} image")
        return lambda: analyze_local_complexity(ctx)
    if what == "weight-noise":
        levels = parse_levels(ctx.args.noise_levels)
        return lambda: analyze_weight_noise(ctx, levels)
    return {"misclassified": lambda: analyze_misclassified(ctx), "confusion": lambda: analyze_confusion(ctx),
            "guided-backprop": lambda: analyze_guided_backprop(ctx)}[what]


# ---- drawing ------------------------------------------------------------------------------------------


def displayable(image: torch.Tensor) -> np.ndarray:
    """(C, H, W) in [0, 1] -> (H, W) for one channel, (H, W, C) otherwise."""
    array = image.detach().float().clamp(0, 1).cpu().numpy()
    return array[0] if array.shape[0] == 1 else array.transpose(1, 2, 0)


def save_grid(path: Path, cells: list[tuple[torch.Tensor, str, np.ndarray | None]], columns: int, title: str) -> Path:
    """One panel per (image (C, H, W), caption, heat map (H, W) in [0, 1] drawn over it, or None)."""
    if not cells:
        fig, ax = plt.subplots(figsize=(4, 1.5))
        ax.axis("off")
        ax.text(0.5, 0.5, "nothing to show", ha="center", va="center")
        ax.set_title(title, fontsize=9)
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path
    columns = min(columns, len(cells))
    rows = math.ceil(len(cells) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(1.6 * columns, 2.0 * rows + 0.4), squeeze=False, layout="constrained")
    for ax in axes.flat:
        ax.axis("off")
    for ax, (image, caption, heat) in zip(axes.flat, cells):
        shown = displayable(image)
        if heat is not None:  # the heat map over a gray copy of the image: colour would drown it
            gray = shown if shown.ndim == 2 else shown.mean(2)
            ax.imshow(gray, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            ax.imshow(heat, cmap="jet", alpha=0.5, vmin=0, vmax=1, interpolation="bilinear")
        else:
            ax.imshow(shown, cmap="gray" if shown.ndim == 2 else None, vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(caption, fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    with open(path, "w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(header)
        writer.writerows(rows)
    return path


# ---- the analyses -------------------------------------------------------------------------------------


def analyze_misclassified(ctx: Context) -> list[Path]:
    """Every error of the evaluated images, most confident first (.csv), and the first --top as a grid."""
    images, labels = ctx.evaluated()
    probs = ctx.probabilities()
    confidence, predicted = probs.max(1)
    wrong = (predicted != labels).nonzero().flatten()
    order = wrong[torch.argsort(confidence[wrong], descending=True, stable=True)]
    rows = [[int(i), int(labels[i]), int(predicted[i]), f"{float(confidence[i]):.6f}", f"{float(probs[i, labels[i]]):.6f}"]
            for i in order]
    csv_path = write_csv(ctx.path("misclassified.csv"), ["index", "true", "predicted", "confidence", "true_probability"], rows)
    cells = [(images[i], f"{ctx.names[labels[i]]} -> {ctx.names[predicted[i]]}\np={float(confidence[i]):.2f}", None)
             for i in order[:ctx.args.top]]
    title = (f"most confident errors (true -> predicted, confidence): {len(order)} of {len(labels)} {ctx.args.split} images "
             f"wrong ({ctx.checkpoint.name} checkpoint)")
    return [save_grid(ctx.path("misclassified.png"), cells, 8, title), csv_path]


def analyze_confusion(ctx: Context) -> list[Path]:
    _, labels = ctx.evaluated()
    predicted = ctx.probabilities().argmax(1)
    classes = len(ctx.names)
    matrix = confusion_matrix(labels, predicted, classes).numpy()
    csv_path = write_csv(ctx.path("confusion.csv"), ["true\\predicted", *ctx.names],
                         [[ctx.names[i], *map(int, matrix[i])] for i in range(classes)])
    acc = np.trace(matrix) / max(matrix.sum(), 1)
    png = save_confusion(ctx.path("confusion.png"), matrix, ctx.names, f"{ctx.args.split}: accuracy {acc:.4f} on {matrix.sum()} images")
    return [png, csv_path]


def conv_layers(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, nn.Conv2d)]


def output_shapes(model: nn.Module, sample: torch.Tensor) -> dict[str, tuple[int, ...]]:
    """{module name: the shape of its output} for every module whose output is a tensor, in the order
    the forward pass of `sample` calls them (a module called twice: its first output)."""
    shapes = {}

    def recorder(name: str):
        def hook(module, args, output):  # returns None: the output passes on unchanged
            if torch.is_tensor(output):
                shapes.setdefault(name, tuple(output.shape))
        return hook

    handles = [module.register_forward_hook(recorder(name)) for name, module in model.named_modules() if name]
    try:
        with torch.no_grad():
            model(sample)
    finally:
        for handle in handles:
            handle.remove()
    return shapes


def gradcam_layer(ctx: Context) -> str:
    """--layer, or by default the last Conv2d (in forward order) whose output is larger than 1 x 1: Grad-CAM
    weights each channel of the layer's output by its mean gradient, so on a 1 x 1 map (mnist_tiny's
    classifier, a 1x1 conv after global pooling) every map is one constant. A UserError for no such
    module, a non-spatial output, or a 1 x 1 one; the shapes come from one forward pass of a blank image."""
    modules = dict(ctx.model.named_modules())
    convs = conv_layers(ctx.model)
    name = ctx.args.layer
    if name is not None and (name not in modules or name == ""):
        raise UserError(f"--layer {name!r}: no such module; conv layers: {', '.join(convs)} (any module name with a "
                        f"(N, C, H, W) output larger than 1 x 1 works)")
    spec = dataset_spec(ctx.cfg.data)
    shapes = output_shapes(ctx.model, torch.zeros(1, spec.channels, spec.image_size, spec.image_size, device=ctx.device))
    spatial = [conv for conv in shapes if conv in convs and len(shapes[conv]) == 4 and shapes[conv][2] * shapes[conv][3] > 1]
    if name is None:
        if not spatial:
            raise UserError("gradcam: the model has no Conv2d layer with an output larger than 1 x 1; give --layer NAME "
                            "(a module with a spatial (N, C, H, W) output)")
        return spatial[-1]
    shape = shapes.get(name)
    if shape is None or len(shape) != 4:
        raise UserError(f"--layer {name!r}: its output has shape {shape or 'none'}, Grad-CAM needs a spatial "
                        f"(N, C, H, W) one; conv layers: {', '.join(convs)}")
    if shape[2] * shape[3] == 1:
        raise UserError(f"--layer {name!r}: its output is 1 x 1 (shape {shape}), so every Grad-CAM map would be constant; "
                        f"conv layers with a larger output: {', '.join(spatial) or 'none'}")
    return name


def gradcam(model: nn.Module, layer: str, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Grad-CAM (Selvaraju et al. 2017) of class `target[i]` for image `x[i]` at module `layer`: captum's
    LayerGradCam (per-channel mean gradient x activation, summed over channels, ReLU'd as in the paper),
    upsampled bilinearly to the image size. (N, H, W)."""
    cam = LayerGradCam(model, dict(model.named_modules())[layer]).attribute(x, target=target, relu_attributions=True)
    return LayerAttribution.interpolate(cam.detach(), tuple(x.shape[-2:]), interpolate_mode="bilinear")[:, 0]


def unit_scale(maps: torch.Tensor) -> np.ndarray:
    """(N, H, W) -> each map divided by its maximum (all-zero maps stay zero)."""
    peak = maps.flatten(1).max(1).values.clamp_min(1e-12)
    return (maps / peak[:, None, None]).clamp(0, 1).cpu().numpy()


def attribution_inputs(ctx: Context) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, np.ndarray]:
    """(images on the device, labels, predicted classes, indices) of the images to explain."""
    images, labels, indices = ctx.picked(DEFAULT_SHOWN)
    x = images.to(ctx.device)
    with torch.no_grad():
        predicted = ctx.model(x).argmax(1)
    return x, labels, predicted, indices


def caption(ctx: Context, index: int, label: int, predicted: int) -> str:
    label, predicted = int(label), int(predicted)
    return f"#{index} {ctx.names[label]}" + ("" if label == predicted else f"\npred {ctx.names[predicted]}")


def analyze_gradcam(ctx: Context, layer: str) -> list[Path]:
    """Grad-CAM of the predicted class at `layer`, drawn over each image."""
    x, labels, predicted, indices = attribution_inputs(ctx)
    heat = unit_scale(gradcam(ctx.model, layer, x, predicted))
    cells = []
    for k, index in enumerate(indices):
        cells += [(x[k], caption(ctx, index, labels[k], predicted[k]), None), (x[k], "Grad-CAM", heat[k])]
    return [save_grid(ctx.path("gradcam.png"), cells, 8, f"Grad-CAM of the predicted class at {layer}")]


def analyze_guided_backprop(ctx: Context) -> list[Path]:
    """Guided backpropagation (Springenberg et al. 2015) of the predicted class: captum's GuidedBackprop,
    which only lets positive gradients through nn.ReLU modules (other activations pass the plain
    gradient). Shown signed: gray = 0, each map scaled by its largest magnitude."""
    x, labels, predicted, indices = attribution_inputs(ctx)
    with warnings.catch_warnings():  # captum announces its ReLU hooks on every call
        warnings.simplefilter("ignore", UserWarning)
        attribution = GuidedBackprop(ctx.model).attribute(x.clone().requires_grad_(True), target=predicted).detach()
    peak = attribution.abs().flatten(1).max(1).values.clamp_min(1e-12)
    shown = 0.5 + 0.5 * attribution / peak[:, None, None, None]
    cells = []
    for k, index in enumerate(indices):
        cells += [(x[k], caption(ctx, index, labels[k], predicted[k]), None), (shown[k], "guided backprop", None)]
    return [save_grid(ctx.path("guided-backprop.png"), cells, 8, "guided backpropagation of the predicted class")]


def parse_classes(text: str | None, names: list[str]) -> list[int]:
    if text is None:
        return list(range(len(names)))
    classes = []
    for item in (item.strip() for item in text.split(",") if item.strip()):
        if item in names:
            classes.append(names.index(item))
        elif item.lstrip("-").isdigit() and 0 <= int(item) < len(names):
            classes.append(int(item))
        else:
            raise UserError(f"--classes: {item!r} is neither a class index (0-{len(names) - 1}) nor a class name"
                            + (f" ({', '.join(names)})" if len(names) <= 20 else ""))
    if not classes:
        raise UserError("--classes: give at least one class")
    return classes


def class_model(model: nn.Module, classes: list[int], shape: tuple[int, ...], steps: int, lr: float, l2: float,
                device, progress: bool = False) -> torch.Tensor:
    """Simonyan et al.'s class model: for each class c, argmax_x S_c(x) - l2 ||x - gray||^2 over images x
    in [0, 1], S_c the unnormalised logit, by gradient ascent from a gray image. Returns (K, *shape).
    Adam rather than plain gradient steps: its step is about `lr` pixels whatever the logit scale of
    the model, so one setting works for every network. Pixels are clamped to [0, 1] after each step."""
    gray = torch.full((len(classes), *shape), 0.5, device=device)
    x = gray.clone().requires_grad_(True)
    target = torch.as_tensor(classes, device=device)
    optimizer = torch.optim.Adam([x], lr=lr)
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        for _ in tqdm(range(steps), desc="class model", unit="step", disable=None if progress else True):
            score = model(x).gather(1, target[:, None]).sum()
            objective = score - l2 * (x - gray).square().sum()
            (x.grad,) = torch.autograd.grad(-objective, x)  # the image's gradient only: the weights collect none
            optimizer.step()
            with torch.no_grad():
                x.clamp_(0, 1)
    finally:
        for module, training in modes.items():
            module.training = training
    return x.detach()


def analyze_class_model(ctx: Context, classes: list[int]) -> list[Path]:
    spec = dataset_spec(ctx.cfg.data)
    args = ctx.args
    images = class_model(ctx.model, classes, (spec.channels, spec.image_size, spec.image_size), args.steps, args.lr, args.l2,
                         ctx.device, progress=True)
    with torch.no_grad():
        probs = ctx.model(images).softmax(1)
    cells = [(images[k], f"{ctx.names[c]}\np={float(probs[k, c]):.2f}", None) for k, c in enumerate(classes)]
    title = f"class models: {args.steps} steps of gradient ascent on the logit, L2 weight {args.l2:g}"
    return [save_grid(ctx.path("class-model.png"), cells, 10, title)]


def analyze_local_complexity(ctx: Context) -> list[Path]:
    diag, args = ctx.cfg.diagnostics, ctx.args
    images, _, _ = ctx.picked(diag.local_complexity_samples)
    directions = args.directions or diag.local_complexity_directions
    radius = args.radius or diag.local_complexity_radius
    result = local_complexity(ctx.model, images.to(ctx.device), directions, radius, ctx.seed, batch_size=ctx.batch_size,
                              progress=True)
    rows = [[name, result.neurons[name], f"{value:.6f}", f"{value / result.neurons[name]:.8f}"] for name, value in result.layers.items()]
    rows.append(["total", sum(result.neurons.values()), f"{result.total:.6f}",
                 f"{result.total / max(sum(result.neurons.values()), 1):.8f}"])
    csv_path = write_csv(ctx.path("local-complexity.csv"), ["layer", "neurons", "mean_cut", "fraction_cut"], rows)

    names = list(result.layers)
    fig, ax = plt.subplots(figsize=(7, 1.2 + 0.35 * max(len(names), 1)))
    if names:
        values = [result.layers[name] for name in names]
        ax.barh(range(len(names)), values, color="tab:blue")
        ax.set_yticks(range(len(names)), names, fontsize=7)
        ax.invert_yaxis()  # forward order, top to bottom
        for i, name in enumerate(names):
            ax.text(values[i], i, f" {values[i]:.2f} of {result.neurons[name]}", va="center", fontsize=7)
        ax.set_xlabel("neurons cut per image (mean)")
    else:
        ax.axis("off")
        ax.text(0.5, 0.5, "no ReLU-like layers: local complexity 0", ha="center", va="center")
    ax.set_title(f"local complexity {result.total:.3f} (P={directions}, r={radius:g}, {len(images)} {args.split} images)", fontsize=9)
    fig.tight_layout()
    png = ctx.path("local-complexity.png")
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return [png, csv_path]


def parse_levels(text: str) -> list[float]:
    try:
        levels = [float(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise UserError(f"--noise-levels {text!r}: expected comma-separated numbers, e.g. 0,0.1,0.5") from None
    if not levels or any(not (level >= 0 and math.isfinite(level)) for level in levels):
        raise UserError(f"--noise-levels {text!r}: expected one or more finite levels >= 0")
    return sorted(set(levels))


def noisy_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, module) for name, module in model.named_modules()
            if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)) and module.weight.numel() > 1]


@torch.no_grad()
def weight_noise(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, levels: list[float], trials: int, seed: int,
                 batch_size: int, device, progress: bool = False) -> list[tuple[str, float, int, float]]:
    """(layer, level, trial, accuracy) for every conv/linear layer, noise level and trial: Gaussian noise
    of std = level x the std of that layer's weights is added to that layer's weights alone, the images
    are evaluated, and the weights are copied back bit for bit. Level 0 is evaluated once per layer
    (trial 0): without noise every trial is the same. Noise is drawn on the CPU from a generator seeded
    by (seed, layer, level, trial), so results do not depend on the device or on other analyses."""
    layers = noisy_layers(model)
    before = {name: value.detach().clone() for name, value in model.state_dict().items()}
    jobs = [(i, j, t) for i in range(len(layers)) for j, level in enumerate(levels) for t in range(trials if level > 0 else 1)]
    rows = []
    for i, j, t in tqdm(jobs, desc="weight noise", unit="eval", disable=None if progress else True):
        name, module = layers[i]
        weight = module.weight
        original = weight.detach().clone()
        generator = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, i, j, t]).generate_state(1)[0]))
        noise = torch.randn(weight.shape, generator=generator) * (levels[j] * original.float().std().item())
        try:
            weight.add_(noise.to(weight.device, weight.dtype))
            rows.append((name, levels[j], t, accuracy(model, images, labels, batch_size, device)))
        finally:
            weight.copy_(original)
    changed = [name for name, value in model.state_dict().items() if not torch.equal(value, before[name])]
    if changed:  # a bug, not a user mistake: the model must leave as it came
        raise RuntimeError(f"weight noise: the weights were not restored exactly: {', '.join(changed)}")
    return rows


def analyze_weight_noise(ctx: Context, levels: list[float]) -> list[Path]:
    images, labels = ctx.evaluated()
    clean = accuracy(ctx.model, images, labels, ctx.batch_size, ctx.device)
    rows = weight_noise(ctx.model, images, labels, levels, ctx.args.trials, ctx.seed, ctx.batch_size, ctx.device, progress=True)
    csv_path = write_csv(ctx.path("weight-noise.csv"), ["layer", "level", "trial", "accuracy"],
                         [[name, level, trial, f"{acc:.6f}"] for name, level, trial, acc in rows])
    layers = list(dict.fromkeys(name for name, *_ in rows))
    mean = np.array([[np.mean([acc for name, level, _, acc in rows if name == layer and level == lv]) for lv in levels]
                     for layer in layers])
    title = (f"accuracy with noise in one layer ({len(labels)} {ctx.args.split} images, clean {clean:.4f}, "
             f"mean of {ctx.args.trials} trial{'s' if ctx.args.trials > 1 else ''})")
    png = save_heatmap(ctx.path("weight-noise.png"), mean, layers, [f"{lv:g}" for lv in levels], title,
                       "noise std / layer weight std", "layer", "accuracy")
    print(f"weight-noise: clean accuracy {clean:.4f} on {len(labels)} images", flush=True)
    return [png, csv_path]


# ---- W&B ------------------------------------------------------------------------------------------------


def recorded_wandb_id(run_dir: Path) -> str | None:
    """The W&B run id of the training run: the one its `last` checkpoint stored (the loop's TrainState,
    which a resumed training run also continues), else the id in the name of its newest W&B folder."""
    last = ckpt.readable(run_dir / "checkpoints" / "last")
    for path in sorted(last.glob("custom_checkpoint_*.pkl")) if last else []:
        try:
            state = torch.load(path, weights_only=True)
        except Exception:  # another registered object's state, or an unreadable file: not the loop's counters
            continue
        if isinstance(state, dict) and state.get("wandb_run_id"):
            return str(state["wandb_run_id"])
    folders = sorted((run_dir / "wandb").glob("*run-*-*"), key=lambda path: path.name.split("run-", 1)[1])
    folders = [path for path in folders if path.is_dir()]
    return folders[-1].name.rsplit("-", 1)[1] if folders else None


def number_or_text(value: str):
    try:
        return int(value)
    except ValueError:
        try:
            return float(value)
        except ValueError:
            return value


def log_to_wandb(ctx: Context, files: list[Path]) -> None:
    """Log the PNGs (as images) and CSVs (as tables) under analysis/<name> to the training run's W&B run
    when its id is recorded (resumed: online they follow its history; offline they wait in
    RUN/wandb/ for `wandb sync` like the training's own folders), else to a new run of the same project
    with job_type "analysis" and the training run's name + "-analysis". --wandb auto follows the run's
    log.wandb (online falls back to offline without an API key or server, as in training)."""
    requested = ctx.cfg.log.wandb if ctx.args.wandb == "auto" else ctx.args.wandb
    mode = resolve_wandb_mode(requested)
    if mode == "disabled" or not files:
        return
    log = ctx.cfg.log
    run_id = recorded_wandb_id(ctx.run_dir)
    kwargs = dict(project=log.project, entity=log.entity, dir=str(ctx.run_dir),
                  settings=wandb.Settings(init_timeout=90, silent=True, console="off"))
    if run_id:
        kwargs |= dict(id=run_id, resume="allow")
    else:
        kwargs |= dict(job_type="analysis", name=f"{log.name or ctx.run_dir.name}-analysis", group=log.group,
                       tags=list(log.tags), config=ctx.cfg.model_dump(mode="json") | {"analysis_checkpoint": str(ctx.checkpoint)})
    run = with_offline_fallback(mode, lambda chosen: wandb.init(mode=chosen, **kwargs))  # the files are on disk already
    payload = {}
    for path in files:
        if path.suffix == ".png":
            payload[f"analysis/{path.stem}"] = wandb.Image(str(path), caption=f"{path.stem} of {ctx.checkpoint}")
        elif path.suffix == ".csv":
            with open(path, newline="") as handle:
                header, *rows = list(csv.reader(handle))
            payload[f"analysis/{path.stem}_table"] = wandb.Table(columns=header, data=[list(map(number_or_text, row)) for row in rows])
    run.log(payload)
    where = f"offline in {Path(run.dir).parent}" if run.offline else run.url
    run.finish()
    print(f"W&B: logged {len(payload)} items to run {run.id} ({'resumed' if run_id else 'new, job_type analysis'}; {where})",
          flush=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
