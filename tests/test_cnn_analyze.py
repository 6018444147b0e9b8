"""`python -m cnn.analyze` on a tiny trained run (every analysis: its files, their content, the W&B log),
local complexity (cnn/complexity.py) on networks whose boundaries are known, and local complexity
logged during training without changing the training."""
from __future__ import annotations

import csv
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib import image as mpimg
from safetensors.torch import load_file
from torch import nn

from conftest import ROOT, SMOKE_CNN, clean_env, read_metrics, run_entry, wandb_log, wandb_run
from cnn.analyze import ANALYSES, attribution_inputs, build_parser, class_model, gradcam, gradcam_layer, load, main, output_shapes
from cnn.complexity import local_complexity, random_directions
from cnn.data import build_datasets
from harness import checkpoint as ckpt
from harness.config import load_config
from harness.inference import load_ensemble

pytestmark = pytest.mark.usefixtures("one_thread")

ENV = clean_env(OMP_NUM_THREADS="1")  # tiny tensors: a second thread only contends on a shared machine
# Dropout draws from the global RNG on every training step: a measurement that touched it would
# change the weights. Deterministic kernels: two runs are comparable bit for bit.
TRAIN = [SMOKE_CNN, "model.dropout=0.3", "trainer.deterministic=true", "log.progress=plain"]
LC_EVERY = 8  # the smoke run has 8 updates an epoch, 24 in all
CSV_OF = {"misclassified", "confusion", "local-complexity", "weight-noise"}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A 3-epoch smoke run on generated images that logs local complexity every LC_EVERY updates."""
    out = tmp_path_factory.mktemp("analyze") / "run"
    result = run_entry("train.py", *TRAIN, f"output_dir={out}", f"diagnostics.local_complexity_every={LC_EVERY}", env=ENV)
    assert result.returncode == 0, result.stderr
    return out


@pytest.fixture(scope="module")
def mnist_tiny_run(tmp_path_factory) -> Path:
    """One short epoch of mnist_tiny on generated 28 x 28 one-channel images: enough for non-trivial gradients."""
    out = tmp_path_factory.mktemp("analyze_mnist_tiny") / "run"
    result = run_entry("train.py", SMOKE_CNN, "model.name=mnist_tiny", "model.width=null", "data.channels=1",
                       "data.image_size=28", "data.num_train=128", "data.num_val=32", "trainer.epochs=2", "sched.name=cosine",
                       "log.wandb=disabled", "log.plot=false", "log.progress=none", f"output_dir={out}", env=ENV)
    assert result.returncode == 0, result.stderr
    return out


@pytest.fixture(scope="module")
def analysis(run_dir) -> subprocess.CompletedProcess:
    """Every analysis at once on the run's best checkpoint, written to run_dir/analysis and its W&B run."""
    result = subprocess.run([sys.executable, "-m", "cnn.analyze", "all", "--checkpoint", str(run_dir), "--noise-levels", "0,0.5,8",
                             "--trials", "2", "--steps", "40"], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr
    return result


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def best_meta(run_dir: Path) -> dict:
    return ckpt.read_meta(ckpt.resolve(run_dir))


def val_labels(run_dir: Path) -> torch.Tensor:
    cfg = load_config(run_dir / "config.yaml")
    return torch.as_tensor(build_datasets(cfg.data, cfg.seed)[1].labels)


# ---- training-time local complexity ---------------------------------------------------------------------


def test_training_logs_local_complexity_every_n_updates_and_trains_bit_for_bit_the_same(run_dir, tmp_path):
    rows = [row for row in read_metrics(run_dir) if "lc/total" in row]
    assert [row["step"] for row in rows] == [8, 16, 24]
    for row in rows:
        layers = {key: value for key, value in row.items() if key.startswith("lc/") and key != "lc/total"}
        assert sorted(layers) == ["lc/net.0.act", "lc/net.2.act"]  # smoke_cnn's two ReLUs
        assert row["lc/total"] == pytest.approx(sum(layers.values())) and row["lc/total"] > 0

    plain = tmp_path / "plain"
    result = run_entry("train.py", *TRAIN, f"output_dir={plain}", env=ENV)
    assert result.returncode == 0, result.stderr
    assert not any(key.startswith("lc/") for row in read_metrics(plain) for key in row)
    for name in ("last/model.safetensors", "last/weights.safetensors", "best/weights.safetensors"):
        measured, unmeasured = load_file(str(run_dir / "checkpoints" / name)), load_file(str(plain / "checkpoints" / name))
        assert measured.keys() == unmeasured.keys()  # BatchNorm's running statistics included
        assert all(torch.equal(measured[key], unmeasured[key]) for key in measured), name
    losses = lambda run: [row["train/loss"] for row in read_metrics(run) if "train/loss" in row]  # noqa: E731
    assert losses(run_dir) == losses(plain)


# ---- the command ----------------------------------------------------------------------------------------


def test_every_analysis_writes_a_png_csv_where_tabular_and_logs_them_to_the_runs_wandb_run(run_dir, analysis):
    out = run_dir / "analysis"
    for what in ANALYSES:
        png = out / f"{what}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", what
        height, width, _ = mpimg.imread(png).shape
        assert height > 100 and width > 100, what
        assert f"wrote {png}" in analysis.stdout
        assert (out / f"{what}.csv").is_file() == (what in CSV_OF), what
    # The training run's W&B id is recorded: the analysis resumes that run (a second offline folder).
    folders = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(folders) == 2 and len({folder.name.rsplit("-", 1)[1] for folder in folders}) == 1
    view = run_dir.parent / "analysis-wandb"  # conftest's decoder reads the single offline folder of a run dir
    (view / "wandb").mkdir(parents=True)
    (view / "wandb" / "offline-run-analysis").symlink_to(folders[-1])
    assert wandb_run(view)[0]["run_id"] == folders[0].name.rsplit("-", 1)[1]
    (row,) = wandb_log(view)[0]
    for what in ANALYSES:
        assert row[f"analysis/{what}/_type"] == "image-file", what
        if what in CSV_OF:
            assert row[f"analysis/{what}_table/_type"] == "table-file"
            assert row[f"analysis/{what}_table/nrows"] == len(read_csv(out / f"{what}.csv"))
    assert f"to run {folders[0].name.rsplit('-', 1)[1]} (resumed" in analysis.stdout


def test_confusion_rows_sum_to_the_class_counts_and_its_diagonal_is_the_validation_accuracy(run_dir, analysis):
    rows = read_csv(run_dir / "analysis" / "confusion.csv")
    matrix = np.array([[int(row[str(c)]) for c in range(len(rows))] for row in rows])
    labels = val_labels(run_dir)
    assert [row["true\\predicted"] for row in rows] == ["0", "1", "2", "3"]
    assert matrix.sum(1).tolist() == torch.bincount(labels, minlength=4).tolist()
    assert np.trace(matrix) / matrix.sum() == pytest.approx(best_meta(run_dir)["metrics"]["val/acc"])


def test_misclassified_lists_every_error_most_confident_first(run_dir, analysis):
    rows = read_csv(run_dir / "analysis" / "misclassified.csv")
    _, cfg, model = load_ensemble([str(run_dir)])
    dataset = build_datasets(cfg.data, cfg.seed)[1]
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    labels = torch.as_tensor(dataset.labels)
    with torch.no_grad():
        probs = model.eval()(images).softmax(1)
    wrong = set((probs.argmax(1) != labels).nonzero().flatten().tolist())
    assert 0 < len(wrong) < len(labels)  # the smoke run errs on some images: the test has something to check
    assert {int(row["index"]) for row in rows} == wrong
    confidence = [float(row["confidence"]) for row in rows]
    assert confidence == sorted(confidence, reverse=True)
    for row in rows:
        i = int(row["index"])
        assert int(row["true"]) == labels[i] and int(row["predicted"]) == probs[i].argmax() != labels[i]
        assert float(row["confidence"]) == pytest.approx(float(probs[i].max()), abs=1e-5)


def test_weight_noise_keeps_the_clean_accuracy_at_level_0_and_loses_it_at_a_large_level(run_dir, analysis):
    rows = read_csv(run_dir / "analysis" / "weight-noise.csv")
    clean = best_meta(run_dir)["metrics"]["val/acc"]  # what training measured on the same weights and images
    assert list(dict.fromkeys(row["layer"] for row in rows)) == ["net.0.conv", "net.2.conv", "net.6"]  # conv, conv, linear
    by = lambda layer, level: [float(r["accuracy"]) for r in rows if r["layer"] == layer and float(r["level"]) == level]  # noqa: E731
    for layer in ("net.0.conv", "net.2.conv", "net.6"):
        assert by(layer, 0.0) == [pytest.approx(clean, abs=1e-6)]  # one noise-free evaluation, the weights restored
        assert len(by(layer, 0.5)) == 2 and len(by(layer, 8.0)) == 2
        assert np.mean(by(layer, 8.0)) < clean - 0.2


def test_local_complexity_of_the_command_is_what_training_logged_for_the_same_weights(run_dir, analysis):
    rows = {row["layer"]: row for row in read_csv(run_dir / "analysis" / "local-complexity.csv")}
    logged = next(row for row in read_metrics(run_dir) if row["step"] == best_meta(run_dir)["step"] and "lc/total" in row)
    # Same images (seeded by the run's seed), directions, radius and batching as the training probe.
    assert float(rows["total"]["mean_cut"]) == pytest.approx(logged["lc/total"], abs=1e-6)
    for layer in ("net.0.act", "net.2.act"):
        assert float(rows[layer]["mean_cut"]) == pytest.approx(logged[f"lc/{layer}"], abs=1e-6)
    assert int(rows["net.0.act"]["neurons"]) == 8 * 16 * 16  # width 8 at 16 x 16: every channel x position


def test_class_models_raise_their_class_logit_and_stay_pixels(run_dir):
    _, _, model = load_ensemble([str(run_dir)])
    model = model.eval()
    images = class_model(model, [0, 1, 2, 3], (3, 16, 16), steps=30, lr=0.05, l2=0.01, device="cpu")
    assert images.min() >= 0 and images.max() <= 1
    with torch.no_grad():
        gray = model(torch.full_like(images, 0.5)).diagonal()
        ascended = model(images).diagonal()
    assert (ascended > gray + 0.1).all()


@pytest.mark.parametrize("args, says", [
    (["nonsense"], "unknown analysis 'nonsense'; known: misclassified, confusion"),
    (["confusion", "--checkpoint", "/no/such/run"], "--checkpoint /no/such/run: no complete checkpoint"),
    (["confusion", "gradcam", "--layer", "net.9"], "--layer 'net.9': no such module; conv layers: net.0.conv, net.2.conv"),
    (["gradcam", "--layer", "net.6"], "--layer 'net.6': its output has shape (1, 4)"),
])
def test_mistakes_exit_2_with_one_line_and_nothing_written(run_dir, tmp_path, capsys, args, says):
    if "--checkpoint" not in args:
        args = [*args, "--checkpoint", str(run_dir)]
    assert main([*args, "--out", str(tmp_path / "out"), "--wandb", "disabled"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and says in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "out").exists()  # checked before the first analysis ran


def test_gradcam_defaults_to_the_last_conv_larger_than_1x1_and_its_maps_are_not_constant(mnist_tiny_run):
    ctx = load(build_parser().parse_args(["gradcam", "--checkpoint", str(mnist_tiny_run), "--wandb", "disabled"]), [])
    layer = gradcam_layer(ctx)
    x, _, predicted, _ = attribution_inputs(ctx)
    maps = gradcam(ctx.model, layer, x, predicted)
    assert maps.shape == (len(x), 28, 28)
    assert (maps.flatten(1).amax(1) > maps.flatten(1).amin(1) + 1e-6).all()  # every map has a shape, none is flat
    # mnist_tiny ends in a 1x1 conv on the globally pooled map: the last Conv2d, but useless for Grad-CAM.
    shapes = output_shapes(ctx.model, x[:1])
    assert shapes["net.classifier"][2:] == (1, 1)
    assert layer == "net.block6.conv" and shapes[layer][2:] == (5, 5)


def test_gradcam_refuses_a_layer_with_a_1x1_output(mnist_tiny_run, tmp_path, capsys):
    assert main(["gradcam", "--checkpoint", str(mnist_tiny_run), "--layer", "net.classifier", "--out", str(tmp_path / "out"),
                 "--wandb", "disabled"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --layer 'net.classifier': its output is 1 x 1 (shape (1, 4, 1, 1))")
    assert "net.block6.conv" in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "out").exists()


# ---- local complexity on known networks ----------------------------------------------------------------


def placed_relu_net() -> nn.Sequential:
    """4 inputs -> 5 ReLU neurons whose hyperplanes are placed by hand -> 1 ReLU neuron.
    With directions e1, e2 and r = 0.1 around the origin: neuron 0 (x1 + 0.05) and neuron 3 (x2 - 0.05)
    are cut; neuron 1 (x1 + 0.2) is not; neuron 2 (x3 - 0.01) lies 0.01 away, but along e3, outside the
    polytope; neuron 4 ((x1 + x2)/sqrt 2 + 0.08) lies 0.08 < r away, yet the cross-polytope reaches only
    r/sqrt 2 = 0.071 along that diagonal. The output neuron relu(x1 + 0.2) - 0.25 changes sign at x1 =
    0.05, inside the polytope."""
    hidden, out = nn.Linear(4, 5), nn.Linear(5, 1)
    with torch.no_grad():
        s = 1 / math.sqrt(2)
        hidden.weight.copy_(torch.tensor([[1, 0, 0, 0], [1, 0, 0, 0], [0, 0, 1, 0], [0, 1, 0, 0], [s, s, 0, 0]]))
        hidden.bias.copy_(torch.tensor([0.05, 0.2, -0.01, -0.05, 0.08]))
        out.weight.copy_(torch.tensor([[0.0, 1, 0, 0, 0]]))
        out.bias.fill_(-0.25)
    return nn.Sequential(hidden, nn.ReLU(), out, nn.ReLU())


def test_local_complexity_counts_the_neurons_whose_hyperplane_cuts_the_cross_polytope():
    net = placed_relu_net()
    e1_e2 = torch.eye(4)[:2]
    # Sample 2 at x1 = 0.3: only neuron 3 is cut; the output neuron is positive all around.
    inputs = torch.tensor([[0.0, 0, 0, 0], [0.3, 0, 0, 0]])
    result = local_complexity(net, inputs, radius=0.1, basis=e1_e2)
    assert result.layers == {"1": 1.5, "3": 0.5} and result.total == 2.0
    assert result.per_sample.tolist() == [3.0, 1.0] and result.neurons == {"1": 5, "3": 1}
    assert result.metrics() == {"lc/total": 2.0, "lc/1": 1.5, "lc/3": 0.5}
    # A smaller polytope (r = 0.04) around the origin reaches none of them.
    assert local_complexity(net, inputs[:1], radius=0.04, basis=e1_e2).total == 0
    with pytest.raises(ValueError, match="not orthonormal"):
        local_complexity(net, inputs, radius=0.1, basis=torch.tensor([[1.0, 0, 0, 0], [1.0, 1.0, 0, 0]]))


def test_local_complexity_of_a_linear_model_is_zero():
    linear = nn.Sequential(nn.Flatten(), nn.Linear(48, 16), nn.Linear(16, 3))
    result = local_complexity(linear, torch.rand(5, 3, 4, 4), directions=6, radius=0.5)
    assert result.total == 0 and result.layers == {} and result.per_sample.tolist() == [0.0] * 5


class Twice(nn.Module):
    """BatchNorm and dropout (state a measurement must not touch) and one ReLU module applied twice."""

    def __init__(self):
        super().__init__()
        self.conv, self.norm, self.drop = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Dropout(0.5)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.drop(self.norm(self.act(self.conv(x)))) - 0.1).mean((2, 3))


def test_random_directions_are_orthonormal_and_seeded_and_the_model_and_rng_are_left_alone():
    directions = random_directions(3, 5, (3, 4, 4), torch.Generator().manual_seed(0))
    flat = directions.flatten(2)
    assert torch.allclose(flat @ flat.transpose(1, 2), torch.eye(5).expand(3, 5, 5), atol=1e-5)
    assert torch.equal(directions, random_directions(3, 5, (3, 4, 4), torch.Generator().manual_seed(0)))
    assert not torch.allclose(directions, random_directions(3, 5, (3, 4, 4), torch.Generator().manual_seed(1)))

    torch.manual_seed(0)
    model = Twice().train()
    model.norm(torch.randn(8, 4, 4, 4))  # non-trivial running statistics
    state = {key: value.clone() for key, value in model.state_dict().items()}
    inputs = torch.rand(6, 3, 8, 8)
    rng = torch.get_rng_state()
    first = local_complexity(model, inputs, directions=4, radius=0.05, seed=3, batch_size=16)
    assert list(first.layers) == ["act", "act#2"] and first.neurons == {"act": 4 * 8 * 8, "act#2": 4 * 8 * 8}
    assert first.total > 0
    assert model.training and model.norm.training and model.drop.training
    assert all(torch.equal(value, state[key]) for key, value in model.state_dict().items())
    assert torch.equal(torch.get_rng_state(), rng)
    again = local_complexity(model, inputs, directions=4, radius=0.05, seed=3, batch_size=64)  # other batching
    assert again.layers == first.layers
