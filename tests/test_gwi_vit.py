"""The ViT layouts (gwi/models.py VitTiled, VitPerSource): the seismic laid out as the 1st / 3rd
places did, position embeddings resampled from other grids (pretrained files, init_from), what the
config accepts, and a vit_tiled run that trains, resumes from another run's weights at a new side,
and predicts a submission like every other model."""
from __future__ import annotations

import json
import re

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file
from timm.layers import resample_abs_pos_embed
from timm.models import adapt_input_conv

from gwi.models import VitPerSource, VitTiled, create_model
from gwi.task import GwiData, GwiModel, GwiTask
from harness.errors import ConfigError, UserError

from conftest import SMOKE_GWI, infer_here, train_here
from gwi_files import write_test_dir

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(width=0.125, side=56)  # 4 x 4 tokens of 14 x 14: the default encoders at a CPU size


def test_vit_tiled_puts_the_five_shots_side_by_side():
    model = create_model("vit_tiled", **{**TINY, "side": 350})
    seismic = torch.zeros(1, 5, 1000, 70)
    for source in range(5):
        seismic[0, source] = 100 * source + torch.arange(70.0)  # constant in time: resizing time keeps it exactly
    image = model.to_encoder_input(seismic)
    assert image.shape == (1, 1, 350, 350)  # time 1000 -> 350, 5 x 70 receivers unchanged
    for source in range(5):
        torch.testing.assert_close(image[0, 0, :, 70 * source: 70 * (source + 1)], seismic[0, source, :350])


def test_vit_per_source_folds_four_time_samples_per_receiver():
    model = create_model("vit_per_source", **TINY)
    time = torch.arange(1000.0).reshape(1, 1, 1000, 1)
    seismic = (10 * time + torch.arange(70.0)).expand(2, 5, 1000, 70)  # value = 10 t + receiver
    folded = model.fold_time(seismic)
    assert folded.shape == (2, 5, 250, 280)
    for row, receiver, k in [(0, 0, 0), (0, 0, 3), (0, 1, 0), (7, 69, 2), (249, 34, 1)]:
        assert folded[1, 4, row, 4 * receiver + k] == 10 * (4 * row + k) + receiver
    assert model.to_encoder_input(seismic).shape == (2, 5, 56, 56)
    assert model.fold_time(torch.zeros(1, 5, 72, 70)).shape == (1, 5, 18, 280)  # reduced data folds too


def test_per_source_blocks_see_one_source_each():
    """Up to `shared_blocks`, a source's tokens do not depend on the other sources: with every block
    shared, changing source 0 changes the output exactly as averaging says, and the token map of a
    18 x 18 grid is PixelShuffled to 72 x 72 and cropped to the 70 x 70 map."""
    torch.manual_seed(0)
    model = create_model("vit_per_source", encoder="deit_tiny_patch16_224", side=288, shared_blocks=12, width=0.125).eval()
    assert model.grid == (18, 18)
    seismic = torch.randn(1, 5, 1000, 70)
    captured = {}
    model.encoder.norm.register_forward_hook(lambda module, args, out: captured.update(tokens=args[0]))
    with torch.no_grad():
        assert model(seismic).shape == (1, 1, 70, 70)
        whole = captured["tokens"]
        per_source = []
        for source in range(5):
            images = model.to_encoder_input(seismic)[:, source: source + 1]
            x = model.encoder.norm_pre(model.encoder._pos_embed(model.encoder.patch_embed(images)))
            per_source.append(model.encoder.blocks(x))
    torch.testing.assert_close(whole, torch.stack(per_source).mean(0), atol=1e-5, rtol=1e-5)


def test_config_accepts_vit_family_encoders_only():
    for encoder in ("vit_small_patch14_reg4_dinov2", "eva02_large_patch14_clip_224", "deit_tiny_patch16_224",
                    "vit_base_patch14_dinov2.lvd142m"):
        assert GwiModel(name="vit_tiled", encoder=encoder).encoder == encoder
    assert GwiModel(name="vit_tiled").model_dump(include={"encoder", "side", "decoder", "shared_blocks"}) == {
        "encoder": "vit_small_patch14_reg4_dinov2", "side": 350, "decoder": "transformer", "shared_blocks": None}
    assert GwiModel(name="vit_per_source").model_dump(include={"encoder", "side", "decoder", "shared_blocks", "decoder_channels"}) == {
        "encoder": "eva02_small_patch14_224", "side": 252, "decoder": None, "shared_blocks": 4, "decoder_channels": None}
    cases = [
        (dict(name="vit_tiled", encoder="resnet18"),
         r"vit_tiled takes a timm ViT-family encoder \(vit_\*, \*dinov2\*, eva02_\*, deit\*; e.g. vit_small_patch14_reg4_dinov2"),
        (dict(name="vit_per_source", encoder="convnext_atto"), r"vit_per_source takes a timm ViT-family encoder"),
        (dict(name="vit_tiled", encoder="vit_relpos_base_patch16_224"), r"timm.models.vision_transformer_relpos model, not a plain ViT"),
        (dict(name="vit_tiled", encoder="vit_smal_patch14_dinov2"), r"timm has no model 'vit_smal_patch14_dinov2'; nearest: vit_small_patch14_dinov2"),
        (dict(name="unet", side=224), r"unet has no option side; it applies to vit_per_source, vit_tiled"),
        (dict(name="vit_tiled", shared_blocks=2), r"vit_tiled has no option shared_blocks; it applies to vit_per_source"),
        (dict(name="vit_per_source", decoder="conv"), r"vit_per_source has no option decoder"),
        (dict(name="vit_per_source", decoder_channels=[64]), r"vit_per_source has no decoder blocks"),
    ]
    for fields, message in cases:
        with pytest.raises(ValueError, match=message):
            GwiModel(**fields)
    with pytest.raises(ConfigError, match=r"key 'model.side': 100 is not a multiple of vit_small_patch14_reg4_dinov2's patch size 14 \(e.g. 98 or 112\)"):
        create_model("vit_tiled", side=100)
    with pytest.raises(ConfigError, match=r"key 'model.shared_blocks': 13 is not between 0 and eva02_small_patch14_224's 12 blocks"):
        create_model("vit_per_source", side=56, shared_blocks=13)


@pytest.mark.parametrize("decoder", ["transformer", "conv"])
def test_vit_tiled_decoders_learn_a_batch(decoder):
    torch.manual_seed(0)
    model = create_model("vit_tiled", encoder="deit_tiny_patch16_224", side=64, decoder=decoder, decoder_channels=[32])
    seismic = torch.randn(2, 5, 72, 70)
    target = torch.linspace(0.1, 0.9, 70).reshape(1, 1, 70, 1).expand(2, 1, 70, 70)  # velocity growing with depth, scaled
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        loss = ((model(seismic) - 1500) / 3000 - target).abs().mean()
        optimizer.zero_grad()
        loss.backward()
        if not losses:
            assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters()), "a part gets no gradient"
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.95 * losses[0], losses  # measured: transformer 0.89, conv 0.55


# ---- weights from other grids ----------------------------------------------------------------------------


@pytest.mark.parametrize("name, encoder", [("vit_tiled", "vit_small_patch14_reg4_dinov2"), ("vit_per_source", "eva02_tiny_patch14_224")])
def test_pretrained_file_at_another_img_size_loads_resampled(name, encoder, tmp_path, capsys):
    """A whole timm classification model saved at its own img_size (DINOv2's 518: 37 x 37 tokens; EVA-02's
    224: 16 x 16), RGB, with its classifier: the blocks load as they are, the 3-channel patch embedding is
    summed to the layout's one channel, the position embedding is resampled to 4 x 4."""
    torch.manual_seed(1)
    published = timm.create_model(encoder, pretrained=False, num_classes=10)
    saved = published.state_dict()
    path = tmp_path / f"{encoder}.safetensors"
    save_file({k: v.contiguous() for k, v in saved.items()}, path)
    model = create_model(name, encoder=encoder, pretrained_path=str(path), **TINY)
    assert "position embedding resampled to this grid (pos_embed" in capsys.readouterr().out
    own = model.encoder.state_dict()
    for key in (k for k in saved if k.startswith("blocks.")):
        assert torch.equal(own[key], saved[key]), key
    torch.testing.assert_close(own["patch_embed.proj.weight"], adapt_input_conv(1, saved["patch_embed.proj.weight"]))
    prefix = own["pos_embed"].shape[1] - 16  # class / register tokens with an entry of their own
    expected = resample_abs_pos_embed(saved["pos_embed"], new_size=[4, 4], num_prefix_tokens=prefix)
    assert own["pos_embed"].shape == (1, prefix + 16, published.embed_dim) and saved["pos_embed"].shape[1] > prefix + 16
    torch.testing.assert_close(own["pos_embed"], expected)


def test_pretrained_file_of_another_width_is_a_one_line_error(tmp_path):
    save_file(timm.create_model("vit_tiny_patch16_224", pretrained=False).state_dict(), tmp_path / "tiny.safetensors")
    with pytest.raises(UserError) as error:
        create_model("vit_tiled", encoder="vit_small_patch16_224", pretrained_path=str(tmp_path / "tiny.safetensors"), side=64)
    message = str(error.value)
    assert "\n" not in message
    assert "tiny.safetensors: does not fit the vit_small_patch16_224 encoder" in message
    assert "of another shape (" in message and "vs (" in message and "(1, 16, 384)" not in message


def test_load_state_dict_resamples_another_sides_position_embedding():
    torch.manual_seed(0)
    small = create_model("vit_tiled", **TINY).state_dict()
    larger = create_model("vit_tiled", **{**TINY, "side": 84})
    larger.load_state_dict(small)  # strict: every other tensor fits as it is
    own = larger.state_dict()
    for key in small:
        if key != "encoder.pos_embed":
            assert torch.equal(own[key], small[key]), key
    torch.testing.assert_close(own["encoder.pos_embed"],
                               resample_abs_pos_embed(small["encoder.pos_embed"], new_size=[6, 6], num_prefix_tokens=0))


# ---- runs: train, start another at a larger side from its weights, resume, predict ---------------------------

# vit_tiled with a DeiT-tiny encoder at a CPU size, on the smoke config's generated data
FAST_VIT = ["model.name=vit_tiled", "model.encoder=deit_tiny_patch16_224", "model.width=1", "model.decoder_channels=[32]",
            "data.num_train=8", "data.num_val=4", "trainer.batch_size=4", "log.wandb=disabled", "log.plot=false",
            "log.progress=none"]


def weights(run, name="best"):
    return load_file(run / "checkpoints" / name / "weights.safetensors")


def test_init_from_starts_a_new_side_from_another_runs_weights_and_a_resume_keeps_its_own(tmp_path, capsys):
    first, second = tmp_path / "side64", tmp_path / "side96"
    assert train_here(capsys, SMOKE_GWI, f"output_dir={first}", *FAST_VIT, "model.side=64", "trainer.epochs=1").returncode == 0
    # lr ~0: the one update leaves the weights as init_from gave them, to compare
    args = [SMOKE_GWI, f"output_dir={second}", *FAST_VIT, "model.side=96", f"init_from={first}", "optim.lr=1e-12",
            "ema.enabled=false", "trainer.max_steps=1"]
    result = train_here(capsys, *args)
    assert result.returncode == 0, result.stderr
    assert f"init_from: weights of {first / 'checkpoints' / 'best'}" in result.stdout
    start, started = weights(first), weights(second, "last")
    key = "net.encoder.pos_embed"
    assert start[key].shape == (1, 1 + 16, 192) and started[key].shape == (1, 1 + 36, 192)  # DeiT: its class token's entry first
    torch.testing.assert_close(started[key], resample_abs_pos_embed(start[key], new_size=[6, 6], num_prefix_tokens=1))
    for name in (k for k in start if k != key):
        torch.testing.assert_close(started[name], start[name], atol=1e-6, rtol=0)
    meta = json.loads((second / "checkpoints" / "last" / "meta.json").read_text())
    assert meta["step"] == 1  # its own count, not the first run's
    optimizer = torch.load(second / "checkpoints" / "last" / "optimizer.bin", weights_only=False)
    assert {float(s["step"]) for s in optimizer["state"].values()} == {1.0}  # a fresh optimizer: one step

    # a size no model adapts (another decoder width): one line naming the tensors and shapes; a
    # pretrained file is not read (init_from's weights would replace it)
    result = train_here(capsys, SMOKE_GWI, f"output_dir={tmp_path / 'other'}", *FAST_VIT, "model.side=64", f"init_from={first}",
                        "model.decoder_channels=[48]", f"model.pretrained_path={tmp_path / 'gone.safetensors'}")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert re.search(r"its weights do not fit this model: \d+ of another shape \(net\.decoder\.queries \[1, 100, 32\] in the file, "
                     r"\[1, 100, 48\] here, ", result.stderr), result.stderr

    # a resume continues its own checkpoint, even with the init_from run gone
    for path in sorted(first.rglob("*"), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()
    result = train_here(capsys, *args[:-1], "trainer.max_steps=2")
    assert result.returncode == 0, result.stderr
    assert "not used: the run resumes from" in result.stdout and "resumed from" in result.stdout
    assert json.loads((second / "checkpoints" / "last" / "meta.json").read_text())["step"] == 2


def test_init_from_that_is_missing_or_does_not_fit_is_a_one_line_error(tmp_path, capsys, gwi_smoke_run):
    result = train_here(capsys, SMOKE_GWI, f"output_dir={tmp_path / 'a'}", *FAST_VIT, "model.side=64",
                        f"init_from={tmp_path / 'nothing'}")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: key 'init_from': no complete checkpoint (a directory with meta.json) at "
                                               f"'{tmp_path / 'nothing'}'"]
    assert not (tmp_path / "a" / "checkpoints").exists()
    result = train_here(capsys, SMOKE_GWI, f"output_dir={tmp_path / 'b'}", *FAST_VIT, "model.side=64", f"init_from={gwi_smoke_run}")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and re.search(r"its weights do not fit this model: \d+ missing from the file \(net\.\S+, .*\); "
                                         r"142 not in this model \(net\.decoder\.0\.0\.weight, ", lines[0]), lines


def run_train_resume_predict(capsys, tmp_path, overrides):
    """Train 2 updates, resume to 4, predict a Kaggle test folder with flip TTA."""
    run = tmp_path / "run"
    args = [SMOKE_GWI, f"output_dir={run}", *overrides, "trainer.max_steps=2"]
    assert train_here(capsys, *args).returncode == 0
    result = train_here(capsys, *args[:-1], "trainer.max_steps=4")
    assert result.returncode == 0, result.stderr
    assert "resumed from" in result.stdout and json.loads((run / "checkpoints" / "last" / "meta.json").read_text())["step"] == 4
    test_dir = write_test_dir(tmp_path / "test", ["000039dca2", "0001026c8a"])
    out = tmp_path / "submission.csv"
    result = infer_here(capsys, "--checkpoint", run, "--data", test_dir, "--out", out, "--tta", "flip", "--num-workers", "0")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["rows"] == 2 * 70 and len(out.read_text().splitlines()) == 1 + 2 * 70


def test_vit_tiled_trains_resumes_and_predicts(tmp_path, capsys):
    run_train_resume_predict(capsys, tmp_path, [*FAST_VIT, "model.side=64", "optim.name=muon"])


# The issue's own line: DINOv2-small at a reduced side (16 tokens); 5.5 min on idle cores, most of it Muon's bfloat16 step
@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_vit_tiled_with_dinov2_small_trains_resumes_and_predicts(tmp_path, capsys):
    run_train_resume_predict(capsys, tmp_path, [*FAST_VIT, "model.encoder=vit_small_patch14_reg4_dinov2", "model.side=56",
                                                "model.decoder_channels=[64, 64]", "optim.name=muon"])
