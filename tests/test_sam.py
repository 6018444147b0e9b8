"""SAM / ASAM inside the shared loop, checked against a hand computation; batch replays."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from torch.func import functional_call
from torch.utils.data import TensorDataset

from conftest import SMOKE_CNN, read_metrics, train_here
from harness.config import validate
from harness.loop import train
from harness.sam import SharpnessAware
from harness.task import Task, register_task


def toy_data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 3, generator=g)
    return x, x @ torch.tensor([[1.0], [-2.0], [0.5]]) + 0.1 * torch.randn(16, 1, generator=g)


@register_task("toy_regression")
class ToyRegression(Task):
    """A regression task small enough to differentiate by hand; it records the batches it trains on."""

    seen: list[float] = []

    def build_datasets(self, cfg):
        dataset = TensorDataset(*toy_data())
        return dataset, dataset

    def build_model(self, cfg, *, from_checkpoint=False):
        torch.manual_seed(1)
        return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 1))

    def forward(self, model, batch):
        if model.training:
            ToyRegression.seen.append(float(batch[0].sum()))
        return model(batch[0])

    def loss(self, outputs, batch):
        return F.mse_loss(outputs, batch[1])

    def metrics(self, outputs, batch):
        return {"loss": ((outputs - batch[1]) ** 2).mean(1)}


def toy_config(tmp_path, **trainer):
    return validate({"task": "toy_regression", "output_dir": str(tmp_path), "log": {"wandb": "disabled", "plot": False},
                     "optim": {"name": "sgd", "lr": 0.1, "momentum": 0.0, "weight_decay": 0.0},
                     "sched": {"name": "constant"}, "trainer": {"batch_size": 16, "epochs": 1, **trainer}})


@pytest.mark.parametrize("adaptive, clip", [(False, None), (True, None), (False, 0.05)])
def test_one_sam_step_in_the_loop_matches_a_hand_computation(tmp_path, adaptive, clip):
    rho, eta, lr = 0.3, 0.01, 0.1
    cfg = toy_config(tmp_path, max_steps=1, grad_clip=clip)
    cfg.optim.sam_rho, cfg.optim.sam_adaptive, cfg.optim.sam_eta = rho, adaptive, eta
    train(cfg)

    # By hand, on the same initial weights and the whole data set (one batch), with autograd only:
    model = ToyRegression().build_model(cfg)
    x, y = toy_data()
    w0 = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.clone() for k, v in model.named_buffers()}

    def gradient(weights, buffers):
        weights = {k: v.clone().requires_grad_() for k, v in weights.items()}
        loss = F.mse_loss(functional_call(model, (weights, buffers), (x,)), y)
        return dict(zip(weights, torch.autograd.grad(loss, list(weights.values()))))

    g0 = gradient(w0, buffers)  # the first pass updates `buffers` (BatchNorm running statistics)
    # ASAM scales the weights (here also BatchNorm's) by |w| + eta and leaves the biases as in SAM (the authors' rule)
    scale = {k: (w0[k].abs() + eta) if adaptive and "weight" in k else torch.ones_like(w0[k]) for k in w0}
    norm = torch.sqrt(sum(((scale[k] * g0[k]) ** 2).sum() for k in w0))
    perturbed = {k: w0[k] + rho * scale[k] ** 2 * g0[k] / norm for k in w0}
    g1 = gradient(perturbed, {k: v.clone() for k, v in buffers.items()})  # the second pass must not count
    if clip is not None:
        total = torch.sqrt(sum((g ** 2).sum() for g in g1.values()))
        assert total > clip  # so the clipping is really exercised
        g1 = {k: g * clip / (total + 1e-6) for k, g in g1.items()}
    expected = {k: w0[k] - lr * g1[k] for k in w0} | buffers

    trained = load_file(str(tmp_path / "checkpoints" / "last" / "model.safetensors"))
    assert trained.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(trained[key].to(value.dtype), value, atol=2e-6, rtol=1e-5, msg=key)
    # and the step really differs from a plain SGD step
    plain = w0["0.weight"] - lr * g0["0.weight"] * (min(1.0, clip / float(torch.sqrt(sum((g ** 2).sum() for g in g0.values())))) if clip else 1.0)
    assert not torch.allclose(trained["0.weight"], plain, atol=1e-4)


def test_sam_leaves_the_exact_weights_and_skips_a_nonfinite_gradient():
    layer = nn.Linear(3, 2)
    layer(torch.randn(4, 3)).sum().backward()
    before = [p.detach().clone() for p in layer.parameters()]
    sam = SharpnessAware(layer.parameters(), rho=0.5)
    with sam.perturbed(layer):
        moved = torch.sqrt(sum(((p - b) ** 2).sum() for p, b in zip(layer.parameters(), before)))
        assert float(moved.detach()) == pytest.approx(0.5, rel=1e-5)
    assert all(torch.equal(p, b) for p, b in zip(layer.parameters(), before))
    layer.weight.grad[0, 0] = float("inf")  # what an fp16 grad scaler overflow leaves
    assert sam.perturbation(layer) == []


def test_sam_and_asam_train_the_cnn_under_bf16(tmp_path, capsys):
    for name, extra in [("sam", []), ("asam", ["optim.sam_adaptive=true", "optim.sam_rho=1.0"])]:
        result = train_here(capsys, SMOKE_CNN, f"output_dir={tmp_path / name}", "log.wandb=disabled", "optim.sam_rho=0.05",
                            "trainer.mixed_precision=bf16", "trainer.grad_clip=1.0", *extra)
        assert result.returncode == 0, result.stderr
        evals = [row["val/acc"] for row in read_metrics(tmp_path / name) if "val/acc" in row]
        assert evals[-1] > 0.7, (name, evals)


def test_asam_scales_weights_but_not_biases_as_the_authors_code_does():
    """SamsungLabs/ASAM's ascent step, written out: for a parameter whose name contains "weight",
    T = |w| + eta, otherwise T = 1; e = rho T^2 g / ||T g||, the norm over all parameters together."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(12, 2))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * 2)  # biases far from 0: scaling them by |b| + eta would show
    F.cross_entropy(model(torch.randn(5, 2, 4, 4)), torch.tensor([0, 1, 0, 1, 1])).backward()
    rho, eta = 0.7, 0.01
    w = {name: p.detach().clone() for name, p in model.named_parameters()}
    g = {name: p.grad.clone() for name, p in model.named_parameters()}
    t = {name: w[name].abs() + eta if name.endswith("weight") else torch.ones_like(w[name]) for name in w}
    norm = torch.sqrt(sum(((t[name] * g[name]) ** 2).sum() for name in w))
    expected = {name: rho * t[name] ** 2 * g[name] / norm for name in w}

    sam = SharpnessAware(model.parameters(), rho=rho, adaptive=True, eta=eta)
    with sam.perturbed(model):
        moved = {name: p.detach() - w[name] for name, p in model.named_parameters()}
    assert sorted(name for name in w if not name.endswith("weight")) == ["0.bias", "1.bias", "4.bias"]
    for name in w:
        torch.testing.assert_close(moved[name], expected[name], atol=1e-6, rtol=1e-5, msg=name)
    assert all(torch.equal(p, w[name]) for name, p in model.named_parameters())


def test_sam_with_grad_accumulation_is_refused(tmp_path, capsys):
    result = train_here(capsys, SMOKE_CNN, f"output_dir={tmp_path}", "optim.sam_rho=0.05", "trainer.grad_accum_steps=2")
    assert result.returncode == 2
    assert "optim.sam_rho" in result.stderr and "grad_accum_steps" in result.stderr and "Traceback" not in result.stderr


def test_batch_replays_train_each_batch_m_times_in_a_row_for_the_same_number_of_updates(tmp_path):
    ToyRegression.seen.clear()
    train(toy_config(tmp_path, batch_size=4, epochs=2, batch_replays=2))  # 4 batches an epoch
    seen = ToyRegression.seen
    assert len(seen) == 8  # epochs x batches updates ...
    assert seen[0::2] == seen[1::2]  # ... each batch twice in a row ...
    assert len(set(seen[0::2])) == 4  # ... so the data was seen epochs / m = 1 time
    assert read_metrics(tmp_path)[-1]["step"] == 8
