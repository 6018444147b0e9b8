"""cnn models: sizes and output shapes by name, normalisation as the first layer, timm models with
local pretrained weights only, the parameter table, and per-layer gradient norms through the loop."""
from __future__ import annotations

import json
import math
import os
import time

import pytest
import torch

from conftest import SMOKE_CNN, read_metrics, wandb_log
from cnn.diagnostics import parameter_rows
from cnn.models import Normalize, create_model
from harness.config import load_config
from harness.errors import ConfigError, UserError
from harness.loop import train
from harness.task import get_task


pytestmark = pytest.mark.usefixtures("one_thread")


def wandb_history_once_written(run_dir, rows: int, timeout: float = 30) -> list[dict]:
    """The W&B offline history, once it has `rows` rows: in-process, wandb's service may still be
    writing its log when train() returns (a subprocess run is complete when it exits)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            history = wandb_log(run_dir)[0]
        except Exception:  # a log caught mid-write: a truncated record
            history = []
        if len(history) >= rows or time.monotonic() > deadline:
            return history
        time.sleep(0.2)


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name, channels, size, classes, parameters", [
    ("mnist_tiny", 1, 28, 10, 7_410),         # the < 8k challenge
    ("resnet9", 3, 32, 10, 6_573_120),        # Page's DAWNBench ResNet-9: 6.57M
    ("resnet9", 3, 32, 100, 6_573_120 + 90 * 512),
    ("airbench", 3, 32, 10, 1_972_792),       # airbench94's layout, 2x2 stem learned
    ("simplenet", 3, 32, 10, 5_493_834),      # SimpleNet-v1 for CIFAR: 5.48M
    ("smoke_cnn", 3, 16, 4, 5_268),           # width 16: 432 + 32 + 4608 + 64 + 132
])
def test_models_by_name_have_the_published_size_and_output_shape(name, channels, size, classes, parameters):
    model = create_model(name, in_channels=channels, num_classes=classes)
    assert count(model) == parameters
    assert model.train()(torch.rand(2, channels, size, size)).shape == (2, classes)
    assert isinstance(model.normalize, Normalize) and list(model.state_dict())[:2] == ["normalize.mean", "normalize.std"]


def test_mnist_tiny_is_under_8k_and_width_scales_the_others():
    assert count(create_model("mnist_tiny", in_channels=1)) < 8000
    assert count(create_model("resnet9", width=16)) < count(create_model("resnet9")) / 10
    assert create_model("airbench", in_channels=1)(torch.rand(2, 1, 28, 28)).shape == (2, 10)  # any input size


def test_normalize_takes_uint8_or_unit_floats_and_stays_in_the_checkpoint():
    model = create_model("smoke_cnn", in_channels=3, num_classes=4, width=8, mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.3)).eval()
    pixels = torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8)
    assert torch.equal(model(pixels), model(pixels.float() / 255))
    normalized = model.normalize(pixels.float() / 255)
    assert torch.allclose(normalized[:, 1], (pixels[:, 1].float() / 255 - 0.5) / 0.25)
    assert model.state_dict()["normalize.std"].flatten().tolist() == pytest.approx([0.2, 0.25, 0.3])


def test_the_task_builds_the_model_for_its_data_source():
    task = get_task("cnn")
    model = task.build_model(load_config(SMOKE_CNN, ["data.source=cifar100", "model.name=resnet9", "model.width=8", "output_dir=/nonexistent"]))
    assert model(torch.rand(1, 3, 32, 32)).shape == (1, 100)
    assert model.normalize.mean.flatten().tolist() == pytest.approx([0.5071, 0.4865, 0.4409])
    model = task.build_model(load_config(SMOKE_CNN, ["data.source=fashion_mnist", "model.name=mnist_tiny", "model.width=null",
                                                     "output_dir=/nonexistent"]))
    assert count(model) == 7_410 and model.normalize.std.item() == pytest.approx(0.3530)


def test_unknown_model_names_are_config_errors():
    with pytest.raises(ConfigError, match="model.name.*unknown model 'resnet8'.*resnet9"):
        load_config(SMOKE_CNN, ["model.name=resnet8"])
    with pytest.raises(ConfigError, match="unknown timm model 'no_such_net'"):
        load_config(SMOKE_CNN, ["model.name=timm:no_such_net"])
    with pytest.raises(ConfigError, match="model.pretrained_path"):
        create_model("resnet9", pretrained_path="weights.pth")


def test_timm_models_load_pretrained_weights_from_a_local_file_only(tmp_path):
    import timm
    from safetensors.torch import save_file

    source = timm.create_model("test_resnet", num_classes=1000)
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(tmp_path / "test_resnet.safetensors"))
    model = create_model("timm:test_resnet", in_channels=3, num_classes=10, mean=(0.1,) * 3, std=(0.2,) * 3,
                         pretrained_path=str(tmp_path / "test_resnet.safetensors"))
    loaded = model.net.state_dict()
    assert torch.equal(loaded["conv1.0.weight"], source.state_dict()["conv1.0.weight"])  # the file's weights
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)  # a new 10-class head
    assert model.normalize.mean.flatten().tolist() == pytest.approx(list(source.pretrained_cfg["mean"]))  # the weights' inputs
    scratch = create_model("timm:test_resnet", in_channels=1, num_classes=10, mean=(0.1,), std=(0.2,))
    assert scratch(torch.rand(2, 1, 28, 28)).shape == (2, 10) and scratch.normalize.mean.item() == pytest.approx(0.1)
    with pytest.raises(UserError, match="missing.pth.*no such file"):
        create_model("timm:test_resnet", pretrained_path=str(tmp_path / "missing.pth"))
    with pytest.raises(ConfigError, match="model.width"):
        create_model("timm:test_resnet", width=32)


def test_a_model_rebuilt_from_a_checkpoint_does_not_read_its_pretrained_file(tmp_path):
    # As inference rebuilds it: the checkpoint holds the trained weights, the file may be elsewhere.
    cfg = load_config(SMOKE_CNN, ["model.name=timm:test_resnet", "model.width=null", f"model.pretrained_path={tmp_path / 'gone.pth'}"])
    task = get_task("cnn", cfg)
    with pytest.raises(UserError, match="gone.pth.*no such file"):
        task.build_model(cfg)
    assert task.build_model(cfg, from_checkpoint=True).eval()(torch.rand(2, 3, 16, 16)).shape == (2, 4)


def test_parameter_table_is_printed_and_written_once_per_run(tmp_path, capsys):
    cfg = load_config(SMOKE_CNN, [f"output_dir={tmp_path}", "model.name=resnet9", "model.width=8"])
    task = get_task("cnn", cfg)
    model = task.build_model(cfg)
    assert capsys.readouterr().out == "" and not any(tmp_path.iterdir())  # building the model has no side effects
    task.on_train_start(model, tmp_path, 0)  # the loop's call when the run starts
    printed = capsys.readouterr().out
    assert "parameters of resnet9" in printed and "net.layer1.residual.body.0.conv.weight" in printed
    assert f"total {count(model):,} parameters" in printed
    lines = (tmp_path / "parameters.csv").read_text().splitlines()
    assert lines[0] == "name,layer,shape,count,trainable,norm" and len(lines) == 1 + len(list(model.parameters()))
    assert "net.prep.norm.weight,BatchNorm2d,8,8,True," in (tmp_path / "parameters.csv").read_text()
    task.on_train_start(task.build_model(cfg), tmp_path, 8)  # a resumed run stays quiet
    assert capsys.readouterr().out == ""
    frozen = [row for row in parameter_rows(create_model("airbench")) if not row["trainable"]]
    assert frozen and all(row["layer"] == "BatchNorm2d" and row["name"].endswith("weight") for row in frozen)


def test_per_layer_gradient_norms_add_up_to_the_global_norm_and_reach_wandb(tmp_path, monkeypatch):
    # Clipping on (the loop then logs its global train/grad_norm); one update per log window, so each
    # logged per-layer norm is that update's, and their root sum of squares is the global norm.
    for key in [k for k in os.environ if k.startswith("WANDB_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = load_config(SMOKE_CNN, [f"output_dir={tmp_path}", "model.log_grad_norms=true", "log.every_steps=1",
                                  "trainer.grad_clip=1000", "trainer.epochs=2", "log.wandb=offline", "log.plot=false"])
    train(cfg)
    layers = [json.loads(line) for line in (tmp_path / "grad_norms.jsonl").read_text().splitlines()]
    logged = {row["step"]: row["train/grad_norm"] for row in read_metrics(tmp_path) if "train/grad_norm" in row}
    assert [row["step"] for row in layers] == sorted(logged) == list(range(1, 17))
    for row in layers:
        norms = {k: v for k, v in row.items() if k.startswith("grad_norm/")}
        assert set(norms) == {"grad_norm/net.0.conv", "grad_norm/net.0.norm", "grad_norm/net.2.conv", "grad_norm/net.2.norm",
                              "grad_norm/net.6"}
        assert math.sqrt(sum(v * v for v in norms.values())) == pytest.approx(logged[row["step"]], rel=1e-4)
    # The same numbers reach W&B, in the rows of the same steps as train/loss.
    in_wandb = [row for row in wandb_history_once_written(tmp_path, rows=16) if "grad_norm/net.6" in row]
    assert len(in_wandb) == 16 and all("train/loss" in row for row in in_wandb)
    assert [row["grad_norm/net.6"] for row in in_wandb] == pytest.approx([row["grad_norm/net.6"] for row in layers])
