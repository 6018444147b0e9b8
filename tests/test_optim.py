"""Optimizers by name through timm's factory (harness/optim.py): the same groups and the same training
as the hand-built adamw / sgd they replace, Muon's split of the parameters, layer decay, the config
errors, and a few steps of training, SAM and an exact resume with each."""
from __future__ import annotations

import copy
import os
import signal

import pytest
import torch
from torch import nn

from conftest import ROOT, SMOKE_CNN, SMOKE_GWI, read_metrics
from harness import checkpoint as ckpt
from harness.config import load_config, to_plain_dict
from harness.errors import ConfigError
from harness.loop import train
from harness.optim import build_optimizer
from harness.rundir import config_changes, flatten
from harness.task import get_task
from timm.optim import list_optimizers
from test_run_folder import assert_same_run, in_child, snapshot

pytestmark = pytest.mark.usefixtures("one_thread")


def hand_built(oc, model: nn.Module) -> torch.optim.Optimizer:
    """harness/optim.py's adamw and sgd before timm's factory, as they were (the old defaults: betas
    0.9/0.999, Nesterov on): the reference."""
    decay, no_decay = [], []
    for param in model.parameters():
        if not param.requires_grad:
            continue
        (no_decay if oc.no_decay_bias_norm and param.ndim <= 1 else decay).append(param)
    groups = [{"params": decay, "weight_decay": oc.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    if oc.name == "adamw":
        return torch.optim.AdamW(groups, lr=oc.lr, betas=tuple(oc.betas or (0.9, 0.999)))
    nesterov = True if oc.nesterov is None else oc.nesterov
    return torch.optim.SGD(groups, lr=oc.lr, momentum=oc.momentum, nesterov=nesterov and oc.momentum > 0)


def task_model(config, *overrides: str) -> tuple[object, nn.Module]:
    cfg = load_config(config, ["output_dir=/nonexistent", *overrides])
    torch.manual_seed(0)
    return cfg, get_task(cfg.task, cfg).build_model(cfg)


def layout(optimizer) -> tuple[type, list[dict]]:
    """The optimizer's class and its groups: which parameters, at what lr, decay, momentum, betas, ..."""
    return type(optimizer), [group | {"params": [id(p) for p in group["params"]]} for group in optimizer.param_groups]


MODELS = [(SMOKE_CNN, ()), (SMOKE_CNN, ("model.name=resnet9", "model.width=8")), (SMOKE_GWI, ())]
UNCHANGED = [("optim.name=adamw",), ("optim.name=adamw", "optim.no_decay_bias_norm=false"),
             ("optim.name=sgd", "optim.weight_decay=5e-4"), ("optim.name=sgd", "optim.no_decay_bias_norm=false")]


@pytest.mark.parametrize("config,model_args", MODELS)
def test_the_factory_groups_and_decays_the_parameters_as_the_hand_built_optimizers_did(config, model_args):
    for optim_args in UNCHANGED:
        cfg, model = task_model(config, *model_args, *optim_args)
        assert layout(build_optimizer(cfg.optim, model)) == layout(hand_built(cfg.optim, model)), optim_args
    # Without weight decay timm makes one group where the old code made two (both undecayed): the same
    # decay for every parameter, and a checkpoint of that case does not resume across the change.
    cfg, model = task_model(config, *model_args, "optim.weight_decay=0")
    decay = {id(p): group["weight_decay"] for group in build_optimizer(cfg.optim, model).param_groups for p in group["params"]}
    assert decay == {id(p): 0.0 for p in model.parameters() if p.requires_grad}


# The configs there were when the factory replaced the hand-built adamw and sgd.
SHIPPED = ["default", "cnn/cifar10_fast", "cnn/cifar10_fast_at", "cnn/cifar10_free_at", "cnn/cifar10_resnet9",
           "cnn/mnist_tiny", "gwi/caformer_unet", "gwi/convnext_unet", "gwi/hgnet_unet", "gwi/inversionnet", "gwi/unet",
           "smoke/cnn", "smoke/gwi"]


def test_every_shipped_config_gets_the_optimizer_it_got_before():
    for config in SHIPPED:
        cfg, model = task_model(ROOT / "configs" / f"{config}.yaml")
        assert layout(build_optimizer(cfg.optim, model)) == layout(hand_built(cfg.optim, model)), config


@pytest.mark.parametrize("optim_args", [
    ("optim.name=adamw",), ("optim.name=adamw", "optim.betas=[0.8,0.95]", "optim.no_decay_bias_norm=false"),
    ("optim.name=sgd", "optim.lr=0.1"), ("optim.name=sgd", "optim.lr=0.1", "optim.nesterov=false", "optim.momentum=0.85"),
    ("optim.name=sgd", "optim.lr=0.1", "optim.momentum=0"),
], ids=["adamw", "adamw-betas-all-decayed", "sgd-nesterov", "sgd-classical", "sgd-plain"])
def test_adamw_and_sgd_train_bit_for_bit_as_the_hand_built_ones(optim_args):
    cfg, model = task_model(SMOKE_CNN, "model.width=16", "optim.weight_decay=0.05", *optim_args)
    reference, start = copy.deepcopy(model), copy.deepcopy(model)
    optimizers = [build_optimizer(cfg.optim, model), hand_built(cfg.optim, reference)]
    generator = torch.Generator().manual_seed(1)
    for _ in range(5):
        images, labels = torch.rand(8, 3, 16, 16, generator=generator), torch.randint(0, 4, (8,), generator=generator)
        for net, optimizer in zip((model, reference), optimizers):
            nn.functional.cross_entropy(net(images), labels).backward()
            optimizer.step()
            optimizer.zero_grad()
    moved = {name: p for name, p in model.named_parameters()}
    assert all(torch.equal(moved[name], p) for name, p in reference.named_parameters())
    assert all(not torch.equal(moved[name], p) for name, p in start.named_parameters() if p.ndim > 1)  # it trained


class Routed(nn.Module):
    """One parameter of each kind Muon has to route."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)  # 8 x 27 once flattened: Muon
        self.norm = nn.BatchNorm2d(8)  # 1-D weight and bias: AdamW
        self.depthwise = nn.Conv2d(8, 8, 3, groups=8)  # 8 x 1 x 3 x 3, a unit dimension: AdamW
        self.hidden = nn.Linear(128, 16)  # 16 x 128: Muon; every bias: AdamW
        self.head = nn.Linear(16, 16)  # 16 x 16: Muon
        self.thin = nn.Linear(16, 2)  # 2 x 16, a side under 4: AdamW

    def forward(self, x):
        h = self.hidden(self.depthwise(self.norm(self.conv(x))).flatten(1))
        return self.head(h), self.thin(h)


def test_muon_orthogonalises_the_matrices_and_kernels_and_gives_the_rest_adamw():
    torch.manual_seed(0)
    model = Routed()
    muon_params = {"conv.weight", "hidden.weight", "head.weight"}
    cfg = load_config(SMOKE_CNN, ["optim.name=muon", "optim.lr=0.01", "optim.weight_decay=0.1"])
    optimizer = build_optimizer(cfg.optim, model)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    outputs, side = model(torch.randn(64, 3, 8, 8))
    ((outputs - torch.randn(64, 16)).square().mean() + side.square().mean()).backward()  # full-rank gradients
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    optimizer.step()

    group_of = {id(p): group for group in optimizer.param_groups for p in group["params"]}
    for name, p in model.named_parameters():
        state, group = optimizer.state[p], group_of[id(p)]
        assert state["use_muon"] == (name in muon_params), name
        if name in muon_params:
            # Muon: the momentum's orthogonal factor (5 Newton-Schulz steps), scaled by 0.2 sqrt(max(out, in))
            # (timm's AdamW-matching rms): the step, flattened to out x in, has its leading half of singular
            # values at 1 +- 0.3 (Newton-Schulz leaves the directions of a tiny gradient share smaller).
            assert set(state) == {"use_muon", "momentum_buffer"}
            step = (before[name] * (1 - group["lr"] * group["weight_decay"]) - p.detach()).flatten(1)
            singular = torch.linalg.svdvals(step / (group["lr"] * 0.2 * max(step.shape) ** 0.5))
            leading = singular[: (len(singular) + 1) // 2]
            assert 0.7 < float(leading.min()) and float(singular.max()) < 1.3, (name, singular)
            gradient = torch.linalg.svdvals(grads[name].flatten(1))
            assert float(gradient[0] / gradient[len(leading) - 1]) > 1.5  # which the gradient's are not
        else:  # AdamW, with the group's lr, betas, eps and weight decay
            assert {"exp_avg", "exp_avg_sq"} <= set(state)
            expected = before[name].clone().requires_grad_()
            expected.grad = grads[name]
            torch.optim.AdamW([expected], lr=group["lr"], betas=group["betas"], eps=group["eps"],
                              weight_decay=group["weight_decay"]).step()
            torch.testing.assert_close(p.detach(), expected.detach(), msg=name)
    decayed = {name for name, p in model.named_parameters() if group_of[id(p)]["weight_decay"] > 0}
    assert decayed == {"conv.weight", "depthwise.weight", "hidden.weight", "head.weight", "thin.weight"}


def test_a_fallback_list_gives_named_matrices_to_muons_adamw():
    cfg = load_config(SMOKE_CNN, ["optim.name=muon", "optim.opt_args.fallback_list=[head.*]"])
    model = Routed()
    optimizer = build_optimizer(cfg.optim, model)
    outputs, side = model(torch.randn(16, 3, 8, 8))
    (outputs.square().mean() + side.square().mean()).backward()
    optimizer.step()
    routed = {name for name, p in model.named_parameters() if optimizer.state[p]["use_muon"]}
    assert routed == {"conv.weight", "hidden.weight"}  # head.weight, 16 x 16, now AdamW's
    with pytest.raises(ConfigError, match="'fallback_list' chooses the parameters Muon leaves to AdamW; adamw is not a Muon"):
        load_config(SMOKE_CNN, ["optim.name=adamw", "optim.opt_args.fallback_list=[head.*]"])


def test_layer_decay_scales_each_block_of_a_timm_model_and_needs_one():
    cfg, model = task_model(SMOKE_CNN, "model.name=timm:vit_tiny_patch16_224", "model.width=null", "optim.layer_decay=0.5")
    optimizer = build_optimizer(cfg.optim, model)
    lr_of = {name: group["lr"] for group in optimizer.param_groups for p in group["params"]
             for name, q in model.named_parameters() if q is p}
    assert optimizer.param_groups[0]["lr"] == cfg.optim.lr  # what the loop logs as train/lr
    assert lr_of["net.head.weight"] == cfg.optim.lr
    # 12 blocks between the stem and the head: block k at lr x 0.5^(12 - k), the stem at 0.5^13.
    assert lr_of["net.blocks.11.mlp.fc1.weight"] == pytest.approx(cfg.optim.lr * 0.5)
    assert lr_of["net.blocks.0.attn.qkv.weight"] == pytest.approx(cfg.optim.lr * 0.5 ** 12)
    assert lr_of["net.pos_embed"] == lr_of["net.patch_embed.proj.weight"] == pytest.approx(cfg.optim.lr * 0.5 ** 13)
    assert all("lr_scale" not in group for group in optimizer.param_groups)  # applied once, not left for a scheduler

    cfg, model = task_model(SMOKE_CNN, "optim.layer_decay=0.5")  # smoke_cnn: no blocks to number
    with pytest.raises(ConfigError, match="key 'optim.layer_decay': ImageClassifier has no layers to decay over"):
        build_optimizer(cfg.optim, model)


# Under test-all: kron's first step alone takes 40 s on one core; the default run trains adamw, sgd,
# lion and muon (test_each_optimizer_trains_the_cnn_smoke_run) and refuses the others' mistakes.
@pytest.mark.slow
def test_every_timm_optimizer_takes_a_few_steps_from_the_factory_or_is_refused_in_one_line():
    refused = {}
    for name in list_optimizers():
        torch.manual_seed(0)
        model = Routed()
        try:
            optimizer = build_optimizer(load_config(SMOKE_CNN, [f"optim.name={name}"]).optim, model)
        except ConfigError as err:
            refused[name] = str(err)
            continue
        start = copy.deepcopy(model.state_dict())
        for step in range(3):
            outputs, side = model(torch.randn(16, 3, 8, 8))
            (outputs.square().mean() + side.square().mean()).backward()
            optimizer.step()
            optimizer.zero_grad()
            if step == 0:  # what a checkpoint and its resume do to the state
                optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))
        weights = model.state_dict()
        assert all(torch.isfinite(weights[key]).all() for key in weights), name
        assert not torch.equal(weights["hidden.weight"], start["hidden.weight"]), name
    # Second-order adahessian, and the apex / bitsandbytes ones, which need CUDA and their package.
    assert sorted(refused) == sorted(["adahessian", *(n for n in list_optimizers() if n.startswith(("bnb", "fused")))])
    assert all(message.count("\n") == 0 and "key 'optim.name'" in message for message in refused.values())
    assert len(list_optimizers()) - len(refused) > 80


@pytest.mark.parametrize("override,message", [
    ("optim.name=adamww", "key 'optim.name': unknown optimizer 'adamww'; nearest: adamw"),
    ("optim.name=AdamWW", "key 'optim.name': unknown optimizer 'adamww'; nearest: adamw"),
    ("optim.name=adahessian", "key 'optim.name': adahessian needs second-order gradients"),
    ("optim.betas=[0.9,0.99,0.9]", "key 'optim.betas': adamw takes 2 betas, got 3"),
    ("optim.opt_args.ns_step=6", "key 'optim.opt_args': adamw takes no argument 'ns_step'"),
    ("optim.opt_args={lr: 0.1}", "key 'optim.opt_args': 'lr' has its own key: set optim.lr instead"),
])
def test_an_optimizer_mistake_is_one_line_naming_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(SMOKE_CNN, ["optim.name=adamw", override] if not override.startswith("optim.name") else [override])
    assert message in str(err.value) and "\n" not in str(err.value)


def test_opt_args_reach_the_optimizer():
    cfg, model = task_model(SMOKE_CNN, "optim.name=muon", "optim.opt_args.ns_steps=3", "optim.eps=1e-6", "optim.nesterov=true")
    group = build_optimizer(cfg.optim, model).param_groups[0]
    assert (group["ns_steps"], group["eps"], group["nesterov"], group["momentum"], group["betas"]) == (3, 1e-6, True, 0.9, (0.9, 0.95))


def test_a_run_saved_before_the_factory_resumes_without_a_change():
    saved = to_plain_dict(load_config(SMOKE_CNN))  # as a run before the factory wrote it
    saved["optim"] |= {"betas": [0.9, 0.999], "nesterov": True}
    for key in ("eps", "layer_decay", "opt_args"):
        del saved["optim"][key]
    defaults = flatten(to_plain_dict(load_config()))
    for name in ("adamw", "sgd"):
        saved["optim"]["name"] = name
        assert config_changes(saved, to_plain_dict(load_config(SMOKE_CNN, [f"optim.name={name}"])), defaults) == {}
        now = to_plain_dict(load_config(SMOKE_CNN, [f"optim.name={name}", "optim.nesterov=false"]))
        assert config_changes(saved, now, defaults) == {"optim.nesterov": (True, False)}
    since = to_plain_dict(load_config(SMOKE_CNN, ["optim.betas=[0.9,0.999]"]))  # a run of the factory's: a real change
    assert config_changes(since, to_plain_dict(load_config(SMOKE_CNN)), defaults) == {"optim.betas": ([0.9, 0.999], None)}


FEW_STEPS = ["log.wandb=disabled", "log.plot=false", "log.progress=none", "trainer.deterministic=true"]


@pytest.mark.parametrize("optim_args", [
    ("optim.name=adamw",), ("optim.name=sgd", "optim.lr=0.1"), ("optim.name=lion", "optim.lr=1e-3"),
    ("optim.name=muon",), ("optim.name=adamuon",), ("optim.name=muon", "optim.sam_rho=0.05"),
    ("optim.name=lion", "optim.lr=1e-3", "optim.sam_rho=0.05"),
], ids=["adamw", "sgd", "lion", "muon", "adamuon", "muon-sam", "lion-sam"])
def test_each_optimizer_trains_the_cnn_smoke_run(tmp_path, optim_args):
    train(load_config(SMOKE_CNN, [f"output_dir={tmp_path}", *FEW_STEPS, *optim_args]))
    evals = [row for row in read_metrics(tmp_path) if "val/loss" in row]
    assert len(evals) == 3 and evals[-1]["val/loss"] < evals[0]["val/loss"] and evals[-1]["val/acc"] > 0.5, evals


def test_a_muon_run_stopped_and_resumed_is_the_straight_run(tmp_path):
    # 16 updates, `last` every 3; the kill lands right after the second `last` is in place (step 6),
    # so the resume continues Muon's momentum and its AdamW moments from the checkpoint.
    args = [*FEW_STEPS, "optim.name=muon", "optim.lr=0.01", "trainer.epochs=4", "data.num_train=64", "trainer.batch_size=16",
            "model.dropout=0.2", "trainer.save_every_steps=3", "sched.name=cosine"]

    def run(run_dir, kill_at=None):
        if kill_at:  # in the forked child only
            os.environ[ckpt.KILL_AT_ENV] = kill_at
            ckpt._points_reached.clear()
        return train(load_config(SMOKE_CNN, [f"output_dir={run_dir}", *args]))

    run(tmp_path / "straight")
    assert in_child(run, tmp_path / "resumed", "last:placed:2") == -signal.SIGKILL
    assert (tmp_path / "resumed" / "checkpoints" / "last").is_dir()
    run(tmp_path / "resumed")
    assert_same_run(snapshot(tmp_path / "resumed"), snapshot(tmp_path / "straight"))
