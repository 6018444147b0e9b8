"""The gwi encoder-decoder models (gwi/models.py): built by name, (B, 5, T, 70) -> (B, 1, 70, 70) m/s
for any T and both heads, they learn, encoder weights load from local files (and only fitting
ones), the config fields check themselves, and every configs/gwi/*.yaml trains on the CPU."""
from __future__ import annotations

import types
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from safetensors.torch import save_file

from gwi.models import ENCODER_MODELS, VelocityHead, create_model, load_encoder_weights
from gwi.task import GwiData, GwiLoss, GwiModel, GwiTask
from harness.config import load_config
from harness.errors import ConfigError, UserError
from harness.loop import train
from harness.rundir import flatten

from conftest import read_metrics
from gwi_files import write_tree

ROOT = Path(__file__).resolve().parent.parent
MODEL_NAMES = ["inversionnet", *ENCODER_MODELS]
SMALL = dict(width=0.25)  # quarter-width decoders (InversionNet: quarter-width everywhere) keep the CPU busy for less
# the ViT layouts' default encoders on a 56 x 56 image (4 x 4 tokens)
SMALL_OPTIONS = {"vit_tiled": dict(side=56), "vit_per_source": dict(side=56)}


def small(name: str) -> dict:
    return {**SMALL, **SMALL_OPTIONS.get(name, {})}


def build(name: str, seed: int = 0, **options) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_model(name, **{**small(name), **options})


@pytest.fixture(autouse=True)
def two_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(min(threads, 2))
    yield
    torch.set_num_threads(threads)


# ---- shapes, range, heads -----------------------------------------------------------------------------


@pytest.mark.parametrize("head", ["sigmoid", "clamp"])
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_model_maps_any_time_length_to_a_70x70_velocity_map(name, head):
    model = build(name, head=head).eval()
    for time_steps in (1000, 72):
        with torch.no_grad():
            velocity = model(3 * torch.randn(2, 5, time_steps, 70))  # large inputs push a linear head out of range
        assert velocity.shape == (2, 1, 70, 70) and velocity.dtype == torch.float32
        assert velocity.min() >= 1500 and velocity.max() <= 4500


def test_velocity_head_is_parameter_free_and_float32_under_bf16():
    assert not list(VelocityHead("sigmoid").state_dict())
    # InversionNet's checkpoints keep their keys: the head added none
    prefixes = {key.split(".")[0] for key in create_model("inversionnet", width=0.125).state_dict()}
    assert prefixes == {"encoder", "decoder", "to_velocity"}
    logits = torch.linspace(-3, 3, 70 * 70).reshape(1, 1, 70, 70).bfloat16()
    for kind in ("sigmoid", "clamp"):
        velocity = VelocityHead(kind).eval()(logits)
        assert velocity.dtype == torch.float32  # a bf16 velocity would be rounded to 16 m/s steps near 3000
        assert velocity.min() >= 1500 and velocity.max() <= 4500
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert build("hgnet_unet").eval()(torch.randn(1, 5, 72, 70)).dtype == torch.float32
    with pytest.raises(ValueError, match="'sigmoid' or 'clamp'"):
        VelocityHead("tanh")


@pytest.mark.parametrize("name", ["unet", "hgnet_unet", "convnext_unet", "caformer_unet"])
def test_encoder_input_keeps_receiver_x_above_map_column_x(name):
    """The column axis the decoder ends on is the receiver axis: a single live receiver x, taken
    through the model's input resizing and back onto 70 columns the way its output side does
    (unet: area resize; hgnet_unet: stride-4 cells; time-stem models: no resizing), peaks at x."""
    model = build(name)
    for receiver in (0, 17, 34, 52, 69):
        seismic = torch.zeros(1, 5, 72, 70)
        seismic[..., receiver] = 1
        columns = F.adaptive_avg_pool2d(model.to_encoder_input(seismic), (1, 70)).flatten()
        assert columns.argmax() == receiver


# ---- learning ------------------------------------------------------------------------------------------


# Under test-all; the default run trains inversionnet and the unet / hgnet_unet configs.
@pytest.mark.slow
@pytest.mark.parametrize("name", ["unet", "convnext_unet"])
def test_a_few_adam_steps_reduce_the_loss(name):
    samples = 2
    torch.manual_seed(0)
    cfg = types.SimpleNamespace(data=GwiData(num_train=samples, num_val=2, time_steps=72), model=GwiModel(name=name, **SMALL),
                                loss=GwiLoss(), seed=0)
    task = GwiTask(cfg)
    train_set, _ = task.build_datasets(cfg)
    model = task.build_model(cfg).train()
    batch = torch.utils.data.default_collate([train_set[i] for i in range(samples)])
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(20):
        loss = task.loss(task.forward(model, batch), batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0], losses  # measured: unet 0.43, convnext_unet 0.18


# ---- encoder weights from files -------------------------------------------------------------------------


def assert_same_tensors(loaded: dict, expected: dict, keys=None):
    for key in keys if keys is not None else expected:
        assert torch.equal(loaded[key], expected[key]), key


def features_only_name(key: str) -> str:
    """timm's features_only models flatten the top-level sequence: stages.0.x -> stages_0.x"""
    return key.replace("stages.", "stages_", 1)


@pytest.mark.parametrize("name", list(ENCODER_MODELS))
def test_pretrained_path_loads_a_saved_encoder_through_the_config(name, tmp_path):
    # shifted by 1, so no initialisation can match them by chance
    saved = {k: v + 1 if v.is_floating_point() else v for k, v in build(name).encoder.state_dict().items()}
    path = tmp_path / "encoder.safetensors"
    save_file({k: v.contiguous() for k, v in saved.items()}, path)
    cfg = types.SimpleNamespace(data=GwiData(time_steps=72), model=GwiModel(name=name, pretrained_path=str(path), **small(name)))
    model = GwiTask(cfg).build_model(cfg).net
    assert_same_tensors(model.encoder.state_dict(), saved)


def test_a_model_rebuilt_from_a_checkpoint_does_not_read_its_pretrained_file(tmp_path):
    # As inference rebuilds it: the checkpoint holds the trained weights, the file may be elsewhere.
    cfg = types.SimpleNamespace(data=GwiData(time_steps=72), model=GwiModel(name="unet", pretrained_path=str(tmp_path / "gone.pth"), **SMALL))
    with pytest.raises(UserError, match="gone.pth: no such file"):
        GwiTask(cfg).build_model(cfg)
    model = GwiTask(cfg).build_model(cfg, from_checkpoint=True).eval()
    assert model(torch.randn(1, 5, 1000, 70)).shape == (1, 1, 70, 70)


def test_pretrained_path_loads_whole_classification_models(tmp_path):
    """Published ImageNet files: classifier heads are ignored, 3-channel first convolutions are
    adapted to the 5 sources, a replaced stem is skipped, and .pth files work like .safetensors."""
    torchvision = pytest.importorskip("torchvision")
    resnet = torchvision.models.resnet18(weights=None).state_dict()
    torch.save(resnet, tmp_path / "resnet18.pth")
    model = build("unet", pretrained_path=str(tmp_path / "resnet18.pth"))
    encoder = model.encoder.state_dict()
    assert_same_tensors(encoder, resnet, [k for k in resnet if not k.startswith(("fc.", "conv1."))])
    torch.testing.assert_close(encoder["conv1.weight"], timm.models.adapt_input_conv(5, resnet["conv1.weight"]))

    hgnet = timm.create_model("hgnetv2_b0", pretrained=False).state_dict()
    save_file(hgnet, tmp_path / "hgnetv2_b0.safetensors")
    encoder = build("hgnet_unet", pretrained_path=str(tmp_path / "hgnetv2_b0.safetensors")).encoder.state_dict()
    for key in (k for k in hgnet if k.startswith("stages.")):
        assert torch.equal(encoder[features_only_name(key)], hgnet[key]), key
    first_conv = "stem.stem1.conv.weight"
    torch.testing.assert_close(encoder[first_conv], timm.models.adapt_input_conv(5, hgnet[first_conv]))

    convnext = timm.create_model("convnext_atto", pretrained=False).state_dict()
    torch.save({"state_dict": convnext, "epoch": 300}, tmp_path / "convnext_atto.pth")  # a training checkpoint
    model = build("convnext_unet", seed=3, pretrained_path=str(tmp_path / "convnext_atto.pth"))
    encoder = model.encoder.state_dict()
    for key in (k for k in convnext if k.startswith("stages.")):
        assert torch.equal(encoder[features_only_name(key)], convnext[key]), key
    assert encoder["stem_0.weight"].shape == (40, 5, 28, 3)  # the time stem, not ImageNet's 4 x 4 patchify
    assert torch.equal(encoder["stem_1.weight"], convnext["stem.1.weight"])  # the stem's norm still loads


def test_pretrained_path_that_does_not_fit_is_a_clear_error(tmp_path):
    resnet = timm.create_model("resnet18", pretrained=False).state_dict()
    wrong = tmp_path / "resnet18.safetensors"
    save_file(resnet, wrong)
    nothing_matches = r"resnet18\.safetensors: does not fit the hgnetv2_b0 encoder: \d+ of the encoder's \d+ tensors missing.*0 unexpected"
    with pytest.raises(UserError, match=nothing_matches):
        build("hgnet_unet", pretrained_path=str(wrong))

    bigger = timm.create_model("convnext_nano", pretrained=False).state_dict()  # same names, other widths and depths
    save_file(bigger, tmp_path / "convnext_nano.safetensors")
    with pytest.raises(UserError, match=r"convnext_nano\.safetensors.*\d+ unexpected \(stages\..*of another shape"):
        build("convnext_unet", pretrained_path=str(tmp_path / "convnext_nano.safetensors"))

    with pytest.raises(UserError, match=r"missing\.pth: no such file"):
        build("unet", pretrained_path=str(tmp_path / "missing.pth"))
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match=r"junk\.pth: cannot be read"):
        build("unet", pretrained_path=str(tmp_path / "junk.pth"))
    # nothing was half-loaded: a failed load leaves the encoder as it was
    encoder = build("hgnet_unet").encoder
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    with pytest.raises(UserError):
        load_encoder_weights(encoder, wrong, "hgnetv2_b0")
    assert_same_tensors(encoder.state_dict(), before)


# ---- config fields ------------------------------------------------------------------------------------


def test_config_fills_in_model_defaults():
    assert GwiModel(name="hgnet_unet").model_dump(exclude={"width", "head"}) == {
        "name": "hgnet_unet", "encoder": "hgnetv2_b0", "pretrained_path": None, "decoder_channels": [256, 128, 64, 32],
        "drop_path": 0.0, "side": None, "decoder": None, "shared_blocks": None}
    assert GwiModel(name="unet").encoder == "resnet18" and GwiModel(name="unet").decoder_channels == [256, 128, 64, 32, 16]
    assert GwiModel(name="caformer_unet", encoder="convformer_s18.sail_in1k").encoder == "convformer_s18.sail_in1k"
    assert GwiModel().model_dump(exclude_none=True) == {"name": "inversionnet", "width": 1.0, "head": "sigmoid"}


def test_config_rejects_what_a_model_cannot_use():
    cases = [
        (dict(name="convnext_unet", encoder="hgnetv2_b0"), "convnext_unet takes a timm convnext\\* encoder"),
        (dict(name="hgnet_unet", encoder="hgnetv2_b9"), "timm has no model 'hgnetv2_b9'; nearest: hgnetv2_b"),
        (dict(name="unet", encoder="resnet19"), "unet: unknown encoder 'resnet19'.*tu-<name>"),
        (dict(name="unet", encoder="tu-no_such_net"), "timm has no model 'no_such_net'"),
        (dict(name="inversionnet", encoder="resnet18"), "inversionnet has no encoder; encoder applies to caformer_unet"),
        (dict(name="inversionnet", pretrained_path="x.pth"), "inversionnet has no encoder; pretrained_path applies"),
        (dict(name="hgnet_unet", decoder_channels=[64, 32]), "hgnet_unet needs 4 positive decoder channels"),
        (dict(name="unet", drop_path=0.1), "drop_path needs a timm encoder \\('tu-resnet18'\\)"),
        (dict(name="hgnet_unet", drop_path=1.5), "less than 1"),
        (dict(name="unet9000"), "unknown model 'unet9000'; known models: caformer_unet, convnext_unet, hgnet_unet, inversionnet"),
    ]
    for fields, message in cases:
        with pytest.raises(ValidationError, match=message):
            GwiModel(**fields)
    assert GwiModel(name="unet", encoder="tu-resnet18", drop_path=0.1).drop_path == 0.1
    with pytest.raises(ConfigError, match="key 'model.encoder': caformer_unet takes a timm caformer"):
        load_config(ROOT / "configs/gwi/caformer_unet.yaml", ["model.encoder=convnext_tiny"])


# ---- the configs -----------------------------------------------------------------------------------------

# What a CPU check of a GPU config overrides (no DataLoader workers on a 2-core machine); the data is a
# tiny labelled tree in both layouts (a Vel family and a Fault family), read as the configs say.
SMOKE_OVERRIDES = ["trainer.epochs=1", "data.folds=2", "trainer.batch_size=4", "trainer.mixed_precision=no",
                   "data.time_steps=72", "log.wandb=disabled", "trainer.num_workers=0", "log.progress=none", "log.plot=false"]


@pytest.fixture(scope="module")
def labelled_tree(tmp_path_factory):
    return write_tree(tmp_path_factory.mktemp("train_samples"), {"FlatVel_A": ("vel", 4, 2), "CurveFault_A": ("fault", 4, 2)})


# The ViT recipes on a CPU: their layouts and decoders with a small encoder on a small image, batch 2
# (the recipes' own encoders at full side take minutes a step here; see the README's model table).
RECIPE_OVERRIDES = {
    "vit_tiled": ["model.encoder=deit_tiny_patch16_224", "model.side=64", "model.decoder_channels=[64]", "trainer.batch_size=2"],
    "vit_per_source": ["model.encoder=eva02_tiny_patch14_224", "model.side=56", "model.shared_blocks=4", "trainer.batch_size=2"],
}


# 3-7 s each on 2 idle cores; convnext_unet's config (ConvNeXt-S, 54 M parameters) about 11 s and
# caformer_unet's (CAFormer-S18) the slowest of the rest: both run under make test-all, while their
# models' shapes, heads and weight loading are checked at small width above. The ViT recipes train with
# Muon, whose Newton-Schulz step timm computes in bfloat16, about 40x slower than float32 on this CPU
# (37-39 s each): they run under make test-all too, while test_gwi_vit.py trains, resumes and predicts
# vit_tiled with Muon and checks both layouts in the default run.
@pytest.mark.parametrize("name", ["inversionnet", "unet", pytest.param("hgnet_unet", marks=pytest.mark.slow), pytest.param("convnext_unet", marks=pytest.mark.slow),
                                  pytest.param("caformer_unet", marks=pytest.mark.slow), pytest.param("vit_tiled", marks=pytest.mark.slow),
                                  pytest.param("vit_per_source", marks=pytest.mark.slow)])
def test_config_trains_on_the_cpu(name, tmp_path, labelled_tree):
    cfg = load_config(ROOT / "configs" / "gwi" / f"{name}.yaml",
                      [f"output_dir={tmp_path / 'run'}", f"data.roots=[{labelled_tree}]", *SMOKE_OVERRIDES, *RECIPE_OVERRIDES.get(name, [])])
    assert cfg.task == "gwi" and cfg.model.name == name
    assert cfg.checkpoint.monitor == "val/mae_odd" and cfg.checkpoint.mode == "min"
    summary = train(cfg)
    assert summary["stopped"] == "finished" and 0 < summary["best"]["val/mae_odd"] < 3000
    assert {"val/mae_FlatVel_A", "val/mae_CurveFault_A"} <= read_metrics(tmp_path / "run")[-1].keys()
    assert (tmp_path / "run" / "checkpoints" / "best" / "meta.json").is_file()


def test_every_gwi_config_loads():
    stems = sorted(path.stem for path in (ROOT / "configs" / "gwi").glob("*.yaml"))
    names = [stem for stem in stems if "_stage" not in stem]
    assert names == sorted(MODEL_NAMES)
    for stem in stems:
        cfg = load_config(ROOT / "configs" / "gwi" / f"{stem}.yaml")
        assert cfg.model.name == stem.split("_stage")[0] and cfg.data.flip and cfg.loss.name == "l1" and cfg.ema.enabled
        assert cfg.trainer.mixed_precision == "bf16" and cfg.checkpoint.monitor == "val/mae_odd"


def test_vit_tiled_stages_chain_at_growing_sides():
    """1st place's stages, 350 -> 476 -> 588 -> 700: each starts from the previous stage's run and
    changes only what a stage changes."""
    stages = [load_config(ROOT / "configs" / "gwi" / name) for name in
              ("vit_tiled.yaml", "vit_tiled_stage2.yaml", "vit_tiled_stage3.yaml", "vit_tiled_stage4.yaml")]
    assert [cfg.model.side for cfg in stages] == [350, 476, 588, 700]
    assert stages[0].init_from is None
    stage_keys = {"output_dir", "init_from", "model.side", "trainer.epochs", "trainer.batch_size", "trainer.eval_batch_size",
                  "optim.lr", "sched.warmup_steps", "log.tags"}
    for previous, stage in zip(stages, stages[1:]):
        assert stage.init_from == previous.output_dir and stage.output_dir != previous.output_dir
        assert stage.optim.lr < previous.optim.lr
        before, after = flatten(previous.model_dump(mode="json")), flatten(stage.model_dump(mode="json"))
        assert {key for key in after if after[key] != before[key]} <= stage_keys
