"""Models that map seismic shot gathers (B, 5, T, 70) to velocity maps (B, 1, 70, 70) in m/s, and a
factory that builds them by name (`create_model`), so a config picks the model with `model.name`.

    inversionnet    InversionNet (OpenFWI): plain convolutional encoder-decoder, no pretrained parts
    unet            segmentation-models-pytorch Unet on the seismic resized to 256 x 256
    hgnet_unet      timm HGNet-v2 encoder on the seismic resized to 280 x 280, UNet decoder to 70 x 70
    convnext_unet   timm ConvNeXt encoder behind a stem that reads every time sample, UNet decoder
    caformer_unet   the same with a timm CAFormer (or ConvFormer) encoder
    vit_tiled       a timm ViT-family encoder on the 5 shots tiled into one square image (1st place's
                    layout), a transformer or convolutional decoder
    vit_per_source  a timm ViT-family encoder whose first blocks see each source alone, the rest their
                    average, PixelShuffle to 70 x 70 (3rd place's layout)

Every model ends in the same `VelocityHead`. The encoder models are built with random weights
(nothing is ever downloaded); `pretrained_path` loads encoder weights from a local file
(`load_encoder_weights`), e.g. a timm or torchvision ImageNet checkpoint uploaded as a Kaggle dataset.
"""
from __future__ import annotations

import difflib
import fnmatch
import math
import os
from pathlib import Path
from typing import Literal, Sequence

import segmentation_models_pytorch as smp
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from timm.layers import resample_abs_pos_embed
from timm.models import adapt_input_conv
from timm.models.vision_transformer import Block
from torch import nn

from gwi.layout import MAP_SIZE, SOURCE_X, VELOCITY_MAX, VELOCITY_MIN
from harness.errors import ConfigError, UserError, is_local_main_process
from harness.registry import Registry

SEISMIC_CHANNELS = len(SOURCE_X)  # one per source
MODELS = Registry("model")


def register(name: str):
    """Register a model class under `name`, which it also keeps as `model_name` (for its messages)."""
    def add(cls: type[nn.Module]) -> type[nn.Module]:
        cls.model_name = name
        return MODELS.register(name)(cls)

    return add


class VelocityHead(nn.Module):
    """A one-channel map of raw outputs -> velocity in m/s, shared by every model.

    "sigmoid": 1500 + 3000 sigmoid(x), always in range. "clamp": 3000 + 1500 x, clamped to
    [1500, 4500] only in eval mode, so training gets gradients everywhere. Computed in float32:
    under bf16 autocast a bf16 velocity near 3000 m/s would be rounded to steps of 16 m/s, a
    sizeable part of the metric. No parameters, so adding it changed no checkpoint's keys.
    """

    def __init__(self, kind: Literal["sigmoid", "clamp"] = "sigmoid"):
        super().__init__()
        if kind not in ("sigmoid", "clamp"):
            raise ValueError(f"velocity head must be 'sigmoid' or 'clamp', got {kind!r}")
        self.kind = kind

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        if self.kind == "sigmoid":
            return VELOCITY_MIN + (VELOCITY_MAX - VELOCITY_MIN) * torch.sigmoid(x)
        velocity = (VELOCITY_MIN + VELOCITY_MAX) / 2 + (VELOCITY_MAX - VELOCITY_MIN) / 2 * x
        return velocity if self.training else velocity.clamp(VELOCITY_MIN, VELOCITY_MAX)

    def extra_repr(self) -> str:
        return repr(self.kind)


def conv_block(in_channels: int, out_channels: int, kernel_size=3, stride=1, padding=1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.LeakyReLU(0.2, inplace=True),
    )


def deconv_block(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding: int = 0) -> nn.Sequential:
    return nn.Sequential(
        nn.ConvTranspose2d(in_channels, out_channels, kernel_size, stride, padding, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.LeakyReLU(0.2, inplace=True),
    )


def scaled_channels(channels: Sequence[int], width: float) -> list[int]:
    if width <= 0:
        raise ValueError(f"width must be positive, got {width}")
    return [max(1, round(c * width)) for c in channels]


def resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize that low-pass filters where it shrinks (antialias), so decimating the time
    axis does not alias, and is plain bilinear where it grows."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)


# ---- InversionNet -------------------------------------------------------------------------------------


@register("inversionnet")
class InversionNet(nn.Module):
    """InversionNet (Wu & Lin, OpenFWI): a convolutional encoder over (time, receiver) down to a
    1 x 1 latent vector, and a transposed-convolution decoder up to an 80 x 80 map cropped to 70 x 70.

    The encoder first halves only the time axis (four times), since 1000 samples against 70
    receivers is very unbalanced, then halves both axes (three times); for 1000 x 70 input that
    leaves an 8 x 9 grid. An adaptive average pool brings any other time length (time-reduced
    data) to that grid, and a convolution covering the whole grid makes the latent vector, so the
    latent keeps where things are, as a fully connected layer would. Unlike the original, that
    last encoder layer has no BatchNorm, which cannot normalise a 1 x 1 map of a batch of one.

    `width` scales every channel count (1.0 = the original 32..512), so a CPU smoke model can be
    tiny. `head` maps the last layer's output to m/s (`VelocityHead`).
    """

    latent_grid = (8, 9)  # encoder output for 1000 x 70 input

    def __init__(self, in_channels: int = SEISMIC_CHANNELS, width: float = 1.0, head: Literal["sigmoid", "clamp"] = "sigmoid"):
        super().__init__()
        c1, c2, c3, c4, c5 = scaled_channels((32, 64, 128, 256, 512), width)
        along_time = dict(kernel_size=(3, 1), padding=(1, 0))
        self.encoder = nn.Sequential(
            conv_block(in_channels, c1, kernel_size=(7, 1), stride=(2, 1), padding=(3, 0)),
            conv_block(c1, c2, stride=(2, 1), **along_time),
            conv_block(c2, c2, **along_time),
            conv_block(c2, c2, stride=(2, 1), **along_time),
            conv_block(c2, c2, **along_time),
            conv_block(c2, c3, stride=(2, 1), **along_time),
            conv_block(c3, c3, **along_time),
            conv_block(c3, c3, stride=2),
            conv_block(c3, c3),
            conv_block(c3, c4, stride=2),
            conv_block(c4, c4),
            conv_block(c4, c4, stride=2),
            conv_block(c4, c4),
            nn.AdaptiveAvgPool2d(self.latent_grid),
            nn.Conv2d(c4, c5, kernel_size=self.latent_grid),
            nn.LeakyReLU(0.2, inplace=True),
        )
        self.decoder = nn.Sequential(
            deconv_block(c5, c5, kernel_size=5),  # 1 -> 5
            conv_block(c5, c5),
            deconv_block(c5, c4, kernel_size=4, stride=2, padding=1),  # 10
            conv_block(c4, c4),
            deconv_block(c4, c3, kernel_size=4, stride=2, padding=1),  # 20
            conv_block(c3, c3),
            deconv_block(c3, c2, kernel_size=4, stride=2, padding=1),  # 40
            conv_block(c2, c2),
            deconv_block(c2, c1, kernel_size=4, stride=2, padding=1),  # 80
            conv_block(c1, c1),
        )
        self.to_velocity = nn.Conv2d(c1, 1, kernel_size=3, padding=1)
        self.head = VelocityHead(head)

    def forward(self, seismic: torch.Tensor) -> torch.Tensor:
        features = self.decoder(self.encoder(seismic))
        border = (features.shape[-1] - MAP_SIZE) // 2
        features = features[..., border : border + MAP_SIZE, border : border + MAP_SIZE]
        return self.head(self.to_velocity(features))


# ---- encoder weights from a local file ---------------------------------------------------------------

# Prefixes that wrap an encoder's tensor names in checkpoints: DDP / torch.compile, this project's
# networks (GwiNet.net, SmpUNet.unet, .encoder), smp's timm wrapper (.model), other code's .backbone.
WRAPPER_PREFIXES = ("module.", "_orig_mod.", "net.", "unet.", "encoder.", "model.", "backbone.")


def canonical_key(key: str) -> str:
    """A tensor's name without wrapper prefixes and with '_' read as '.', so that a whole timm
    model's `stages.0.blocks.1.conv_dw.weight` and its features-only version's
    `stages_0.blocks.1.conv_dw.weight` (timm flattens the top-level sequences) are the same name."""
    stripped = True
    while stripped:
        stripped = False
        for prefix in WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key, stripped = key[len(prefix):], True
    return key.replace("_", ".")


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a .safetensors file or a torch file (.pth/.pt/.bin: a state_dict, or a
    training checkpoint holding one under "state_dict" / "model")."""
    file = Path(path)
    if not file.is_file():
        raise UserError(f"model.pretrained_path {path}: no such file")
    try:
        if file.suffix == ".safetensors":
            state = load_file(file, device="cpu")
        else:
            state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any reader failure is the file's fault
        raise UserError(f"model.pretrained_path {path}: cannot be read as a state_dict ({type(err).__name__}: {err})") from None
    for wrapper in ("state_dict", "model", "state_dict_ema", "model_ema"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
            break
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)} if isinstance(state, dict) else {}
    if not tensors:
        raise UserError(f"model.pretrained_path {path}: holds no tensors (expected a state_dict: name -> tensor)")
    return tensors


def _examples(names: list[str], count: int = 3) -> str:
    return ", ".join(names[:count]) + (", ..." if len(names) > count else "")


def load_encoder_weights(encoder: nn.Module, path: str | os.PathLike, encoder_name: str = "encoder",
                         replaced: Sequence[str] = ()) -> str:
    """Copy the weights in the file at `path` into `encoder` (called `encoder_name` in messages);
    returns a one-line summary.

    Names are matched after `canonical_key`, so the file may be the encoder's own state_dict, a
    whole timm / torchvision classification model, or a checkpoint of a whole network of this
    project. Tensors of parts the encoder does not have (a classifier head, a decoder) are ignored.
    A first convolution trained on 3 (or 1) input channels is adapted to the encoder's (the 5
    sources; a ViT layout's one image channel) with timm's `adapt_input_conv`, and a ViT's position
    embedding made at another grid is resampled to the encoder's (`resample_position_embedding`). Tensors of the modules in `replaced` (a stem this project swapped for its
    own) are loaded only where their shapes still fit. Anything else that does not fit - an encoder
    tensor the file lacks, a file tensor inside the encoder's parts that the encoder lacks, a
    different shape - is an error naming the file and the counts, and nothing is loaded.
    """
    source = read_state_dict(path)
    own = encoder.state_dict()
    own_by_name = {canonical_key(key): key for key in own}
    if len(own_by_name) != len(own):
        raise RuntimeError(f"{encoder_name}: tensor names collide after canonical_key")
    own_parts = {name.split(".")[0] for name in own_by_name}

    def is_replaced(key: str) -> bool:
        return any(key == module or key.startswith(module + ".") for module in replaced)

    def is_rgb_version_of(tensor: torch.Tensor, wanted: torch.Tensor) -> bool:
        """A first convolution's weight for 3 (or 1) input channels, where ours reads 5."""
        return (tensor.ndim == 4 and tensor.shape[1] in (1, 3)
                and tensor.shape[:1] + tensor.shape[2:] == wanted.shape[:1] + wanted.shape[2:])

    loaded, adapted, resampled, skipped, ignored, unexpected, mismatched, problems_of_shape = {}, [], [], [], [], [], [], []
    for file_key, tensor in source.items():
        name = canonical_key(file_key)
        key = own_by_name.get(name)
        if key is None:
            (unexpected if name.split(".")[0] in own_parts else ignored).append(file_key)
            continue
        wanted = own[key]
        if tensor.shape == wanted.shape:
            loaded[key] = tensor.to(wanted.dtype)
        elif is_replaced(key):
            skipped.append(key)
        elif is_rgb_version_of(tensor, wanted):
            loaded[key] = adapt_input_conv(wanted.shape[1], tensor.float()).to(wanted.dtype)
            adapted.append(key)
        elif name == "pos.embed" and resample_position_embedding(encoder, tensor) is not None:
            loaded[key] = resample_position_embedding(encoder, tensor).to(wanted.dtype)
            resampled.append(f"{key} {tuple(tensor.shape)} -> {tuple(wanted.shape)}")
        else:
            mismatched.append(key)
            problems_of_shape.append(f"{file_key} {tuple(tensor.shape)} vs {tuple(wanted.shape)}")
    # BatchNorm's step counters are bookkeeping, absent from many published files.
    missing = [key for key in own if key not in loaded and key not in mismatched and not is_replaced(key)
               and not key.endswith("num_batches_tracked")]
    if missing or unexpected or mismatched:
        problems = [f"{len(missing)} of the encoder's {len(own)} tensors missing from the file"
                    + (f" ({_examples(missing)})" if missing else "")]
        problems.append(f"{len(unexpected)} unexpected" + (f" ({_examples(unexpected)})" if unexpected else ""))
        if mismatched:
            problems.append(f"{len(mismatched)} of another shape ({_examples(problems_of_shape, 2)})")
        raise UserError(f"model.pretrained_path {path}: does not fit the {encoder_name} encoder: "
                        f"{'; '.join(problems)}; the file's tensors are named like {_examples(list(source), 2)}")
    encoder.load_state_dict({**own, **loaded})
    summary = f"loaded {len(loaded)} encoder tensors from {path}"
    if adapted:
        summary += f"; {_examples(adapted)} adapted to {own[adapted[0]].shape[1]} input channels"
    if resampled:
        summary += f"; position embedding resampled to this grid ({resampled[0]})"
    if skipped:
        summary += f"; not loaded (replaced by this model's own stem): {_examples(skipped)}"
    if ignored:
        summary += f"; ignored {len(ignored)} tensors of parts the encoder has not ({_examples(ignored, 2)})"
    return summary


def report(message: str) -> None:
    """Print once per machine, not once per process."""
    if is_local_main_process():
        print(message, flush=True)


# ---- the encoder models -------------------------------------------------------------------------------


class UNetDecoder(nn.Module):
    """A UNet decoder for an encoder's feature maps (shallowest first, as timm returns them).

    Starting from the deepest map, each block resizes to the next shallower map's size, concatenates
    that map (the skip connection) and applies two conv blocks; one last block, without a skip,
    works at the output size. Resizing to the skip's own size, rather than by a fixed factor 2,
    copes with the odd sizes a 70-wide grid gives (70 -> 35 -> 18 -> 9). `decoder_channels` are
    the blocks' output channels, deepest first: one per encoder map.
    """

    def __init__(self, encoder_channels: Sequence[int], decoder_channels: Sequence[int]):
        super().__init__()
        if len(decoder_channels) != len(encoder_channels):
            raise ValueError(f"decoder_channels needs {len(encoder_channels)} entries (one per encoder stage), "
                             f"got {list(decoder_channels)}")
        deepest, *skips = list(encoder_channels)[::-1]
        blocks, channels = [], deepest
        for skip, out in zip([*skips, 0], decoder_channels):
            blocks.append(nn.Sequential(conv_block(channels + skip, out), conv_block(out, out)))
            channels = out
        self.blocks = nn.ModuleList(blocks)
        self.out_channels = channels

    def forward(self, features: Sequence[torch.Tensor], output_size: tuple[int, int]) -> torch.Tensor:
        x, *skips = list(features)[::-1]
        for block, skip in zip(self.blocks, [*skips, None]):
            size = tuple(skip.shape[-2:]) if skip is not None else output_size
            if tuple(x.shape[-2:]) != size:
                x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
            x = block(x if skip is None else torch.cat([x, skip], dim=1))
        return x


def check_timm_encoder(model_name: str, encoder: str, families: Sequence[str]) -> str:
    """`encoder` if timm knows it and it belongs to one of `families` (name prefixes)."""
    architecture = encoder.split(".")[0]  # "convnext_small.fb_in22k" -> "convnext_small"
    if architecture.startswith(tuple(families)) and timm.is_model(architecture):
        return encoder
    family_models = [m for family in families for m in timm.list_models(f"{family}*")]
    if not architecture.startswith(tuple(families)):
        raise ValueError(f"{model_name} takes a timm {' / '.join(f + '*' for f in families)} encoder "
                         f"(e.g. {', '.join(family_models[:3])}), got {encoder!r}")
    near = difflib.get_close_matches(architecture, family_models, n=3, cutoff=0.5)
    raise ValueError(f"{model_name}: timm has no model {encoder!r}" + (f"; nearest: {', '.join(near)}" if near else ""))


@register("unet")
class SmpUNet(nn.Module):
    """segmentation-models-pytorch's Unet with any encoder it accepts: its own ("resnet18",
    "efficientnet-b0", ...) or any timm model as "tu-<name>".

    A UNet wants a roughly square image whose sides are multiples of 32 (five halvings), and
    returns a map of the same size. So the seismic, T x 70, is resized to 256 x 256 and the output
    area-resized back to 70 x 70:
      - time 1000 -> 256 (antialiased): 3.9 ms per row, still many samples per period of
        OpenFWI's 15 Hz source wavelet, so little is lost; reduced data (data.time_steps) is
        resized the same way, so one model serves any time_steps;
      - receivers 70 -> 256 and the map's columns 256 -> 70: resizing in and out with the same
        (half-pixel) convention maps receiver x to map column x exactly, so the columns line up
        with the receivers above them, which the skip connections rely on;
      - the map's rows (depth) come from the time axis: later arrivals, deeper reflectors; the
        decoder learns that non-linear mapping.
    256 keeps the encoder's deepest map at 8 x 8 and costs about a ResNet at 256 x 256 per sample.
    """

    input_size = (256, 256)
    default_encoder = "resnet18"
    default_decoder_channels = (256, 128, 64, 32, 16)  # smp's default, for its 5 stages

    def __init__(self, encoder: str | None = None, width: float = 1.0, head: Literal["sigmoid", "clamp"] = "sigmoid",
                 decoder_channels: Sequence[int] | None = None, drop_path: float = 0.0,
                 pretrained_path: str | None = None, in_channels: int = SEISMIC_CHANNELS):
        super().__init__()
        encoder = self.check_encoder(encoder or self.default_encoder)
        decoder_channels = scaled_channels(decoder_channels or self.default_decoder_channels, width)
        if len(decoder_channels) != 5:
            raise ValueError(f"unet: decoder_channels needs 5 entries (one per encoder stage), got {list(decoder_channels)}")
        if drop_path and not encoder.startswith("tu-"):
            raise ValueError(f"unet: drop_path needs a timm encoder ('tu-{encoder}'), got {encoder!r}")
        timm_options = {"drop_path_rate": drop_path} if drop_path else {}
        self.unet = smp.Unet(encoder, encoder_weights=None, in_channels=in_channels, classes=1,
                             decoder_channels=decoder_channels, **timm_options)
        self.head = VelocityHead(head)
        if pretrained_path:
            report(load_encoder_weights(self.unet.encoder, pretrained_path, encoder))

    @property
    def encoder(self) -> nn.Module:
        return self.unet.encoder

    @classmethod
    def check_encoder(cls, encoder: str) -> str:
        if encoder.startswith("tu-"):
            return "tu-" + check_timm_encoder("unet", encoder[3:], [""])
        known = smp.encoders.get_encoder_names()
        if encoder not in known:
            near = difflib.get_close_matches(encoder, known, n=3, cutoff=0.5)
            raise ValueError(f"unet: unknown encoder {encoder!r}: give one of segmentation-models-pytorch's "
                             f"({', '.join(near or known[:3])}, ...) or a timm model as 'tu-<name>'")
        return encoder

    def to_encoder_input(self, seismic: torch.Tensor) -> torch.Tensor:
        return resize(seismic, self.input_size)

    def forward(self, seismic: torch.Tensor) -> torch.Tensor:
        logits = self.unet(self.to_encoder_input(seismic))
        return self.head(F.adaptive_avg_pool2d(logits, MAP_SIZE))


class TimmUNet(nn.Module):
    """A timm features-only encoder (four stages, strides 4 to 32) arranged so that its finest
    feature map is the 70 x 70 velocity grid, and a `UNetDecoder` that comes back up to it: no
    crop or resize at the output. Subclasses say how the seismic becomes the encoder's input
    (`to_encoder_input`) and may swap the encoder's stem (`replace_stem`)."""

    model_name = ""  # set by @register
    encoder_families: tuple[str, ...] = ()  # timm name prefixes this model's stem handling fits
    default_encoder = ""
    default_decoder_channels = (256, 128, 64, 32)

    def __init__(self, encoder: str | None = None, width: float = 1.0, head: Literal["sigmoid", "clamp"] = "sigmoid",
                 decoder_channels: Sequence[int] | None = None, drop_path: float = 0.0,
                 pretrained_path: str | None = None, in_channels: int = SEISMIC_CHANNELS):
        super().__init__()
        encoder = self.check_encoder(encoder or self.default_encoder)
        self.encoder = timm.create_model(encoder, pretrained=False, features_only=True, in_chans=in_channels,
                                         drop_path_rate=drop_path)
        replaced = self.replace_stem(in_channels)
        self.decoder = UNetDecoder(self.encoder.feature_info.channels(),
                                   scaled_channels(decoder_channels or self.default_decoder_channels, width))
        self.to_logits = nn.Conv2d(self.decoder.out_channels, 1, kernel_size=3, padding=1)
        self.head = VelocityHead(head)
        if pretrained_path:  # after replace_stem: the stem's weights must fit the new stem
            report(load_encoder_weights(self.encoder, pretrained_path, encoder, replaced))

    @classmethod
    def check_encoder(cls, encoder: str) -> str:
        return check_timm_encoder(cls.model_name, encoder, cls.encoder_families)

    def replace_stem(self, in_channels: int) -> tuple[str, ...]:
        """Swap encoder modules for new ones; returns their names (their pretrained weights may not fit)."""
        return ()

    def to_encoder_input(self, seismic: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, seismic: torch.Tensor) -> torch.Tensor:
        features = self.encoder(self.to_encoder_input(seismic))
        return self.head(self.to_logits(self.decoder(features, (MAP_SIZE, MAP_SIZE))))


@register("hgnet_unet")
class HGNetUNet(TimmUNet):
    """HGNet-v2 (timm `hgnetv2_b0` ... `hgnetv2_b6`) encoder with a UNet decoder.

    The encoder is used as published (its stem only reads 5 channels instead of 3). The seismic is
    resized to 280 x 280 = 4 x 70 per side, so the first stage's stride-4 map is exactly the
    70 x 70 velocity grid (deeper maps 35, 18, 9) and the decoder ends at the output size. Time
    1000 -> 280 is an antialiased decimation (3.6 ms per row); receivers 70 -> 280 put receiver x
    at the centre of stride-4 cell x, so map column x sits below receiver x.
    """

    encoder_families = ("hgnetv2_",)
    default_encoder = "hgnetv2_b0"
    input_size = (4 * MAP_SIZE, 4 * MAP_SIZE)

    def to_encoder_input(self, seismic: torch.Tensor) -> torch.Tensor:
        return resize(seismic, self.input_size)


class TimeStemUNet(TimmUNet):
    """An encoder at full temporal resolution: the encoder's stem convolution (stride 4: ConvNeXt's
    4 x 4 patchify, CAFormer's 7 x 7) is replaced by one that reads every time sample and all 70
    receivers, and turns the time axis into the 70 rows of the velocity grid in one step.

    The seismic's time axis is resampled to 980 = 14 x 70 rows (1000 -> 980: 2 %, antialiased;
    reduced data is stretched back, so one model serves any data.time_steps and its stem always
    sees the same time scale). The new stem is a (28, 3) convolution with stride (14, 1): each
    output row sees about 28 ms, overlapping its neighbours by half, and each column a receiver and its
    two neighbours. Its output, 70 x 70, is the first stage's map; the encoder's own later stages
    halve it (35, 17 or 18, 8 or 9) and the decoder comes back to 70 x 70, column x below receiver x.
    Pretrained files' stem weights do not fit the new stem and are skipped; everything else loads.
    """

    stem_conv = ""  # the encoder's stem convolution, replaced
    time_stride = 14
    time_rows = time_stride * MAP_SIZE

    def replace_stem(self, in_channels: int) -> tuple[str, ...]:
        old = self.encoder.get_submodule(self.stem_conv)
        stride = self.time_stride
        self.encoder.set_submodule(self.stem_conv, nn.Conv2d(in_channels, old.out_channels, kernel_size=(2 * stride, 3),
                                                             stride=(stride, 1), padding=(stride // 2, 1)))
        return (self.stem_conv,)

    def to_encoder_input(self, seismic: torch.Tensor) -> torch.Tensor:
        return resize(seismic, (self.time_rows, seismic.shape[-1]))


@register("convnext_unet")
class ConvNeXtUNet(TimeStemUNet):
    """ConvNeXt (timm `convnext_*`, `convnextv2_*`) encoder behind the time stem (see `TimeStemUNet`),
    UNet decoder. Stage maps 70, 35, 17, 8 (its downsampling convolutions are 2 x 2, stride 2)."""

    encoder_families = ("convnext",)
    default_encoder = "convnext_atto"
    stem_conv = "stem_0"


@register("caformer_unet")
class CAFormerUNet(TimeStemUNet):
    """CAFormer (timm `caformer_*`; ConvFormer, `convformer_*`, has the same layout) encoder behind the
    time stem (see `TimeStemUNet`), UNet decoder. Stage maps 70, 35, 18, 9: two stages of separable
    convolutions, then two of self-attention over 18 x 18 and 9 x 9 tokens."""

    encoder_families = ("caformer_", "convformer_")
    default_encoder = "caformer_s18"
    stem_conv = "stem.conv"


# ---- vision transformers on a seismic layout -------------------------------------------------------------

# timm name patterns of the plain ViT family, and the timm modules whose models these layouts can run
# block by block (VisionTransformer and its DeiT variants, EVA / EVA-02).
VIT_FAMILIES = ("vit_*", "*dinov2*", "eva02_*", "deit*")
VIT_MODULES = ("timm.models.vision_transformer", "timm.models.deit", "timm.models.eva")
VIT_EXAMPLES = ("vit_small_patch14_reg4_dinov2", "eva02_small_patch14_224", "deit_tiny_patch16_224")


def check_vit_encoder(model_name: str, encoder: str) -> str:
    """`encoder` if it is a timm model of the plain ViT family (`VIT_FAMILIES`)."""
    architecture = encoder.split(".")[0]
    families = ", ".join(VIT_FAMILIES)
    if not any(fnmatch.fnmatchcase(architecture, pattern) for pattern in VIT_FAMILIES):
        raise ValueError(f"{model_name} takes a timm ViT-family encoder ({families}; e.g. {', '.join(VIT_EXAMPLES)}), "
                         f"got {encoder!r}")
    if not timm.is_model(architecture):
        near = difflib.get_close_matches(architecture, timm.list_models(VIT_FAMILIES), n=3, cutoff=0.5)
        raise ValueError(f"{model_name}: timm has no model {encoder!r}" + (f"; nearest: {', '.join(near)}" if near else ""))
    module = timm.models.model_entrypoint(architecture).__module__
    if module not in VIT_MODULES:
        raise ValueError(f"{model_name}: {encoder!r} is a {module} model, not a plain ViT / EVA whose blocks these layouts "
                         f"run one by one ({families}; e.g. {', '.join(VIT_EXAMPLES)})")
    return encoder


def resample_position_embedding(encoder: nn.Module, tensor: torch.Tensor) -> torch.Tensor | None:
    """A ViT's absolute position embedding `tensor` made at another grid (a pretrained file at 518
    px, an earlier stage of a staged run), resampled (timm's `resample_abs_pos_embed`, bicubic) to
    `encoder`'s own grid; None when it is not one (another width, a non-square grid)."""
    own = getattr(encoder, "pos_embed", None)
    if own is None or tensor.ndim != 3 or tensor.shape[-1] != own.shape[-1]:
        return None
    grid = encoder.patch_embed.grid_size
    prefix = own.shape[1] - grid[0] * grid[1]  # class / register tokens with an entry of their own
    old_side = math.isqrt(tensor.shape[1] - prefix)
    if old_side * old_side != tensor.shape[1] - prefix:
        return None
    return resample_abs_pos_embed(tensor, new_size=list(grid), old_size=[old_side, old_side], num_prefix_tokens=prefix)


def _resample_on_load(encoder, state_dict, prefix, *args) -> None:
    """load_state_dict pre-hook: another grid's position embedding in the state is resampled to this
    encoder's, so a checkpoint at another side (init_from) loads; a matching one is untouched."""
    key = prefix + "pos_embed"
    tensor = state_dict.get(key)
    if tensor is not None and tensor.shape != encoder.pos_embed.shape:
        resampled = resample_position_embedding(encoder, tensor)
        if resampled is not None:
            state_dict[key] = resampled


class VitLayout(nn.Module):
    """A timm ViT-family encoder (random weights, one input channel, `img_size` = the layout's
    side) on a square image made from the seismic (`to_encoder_input`). Subclasses lay the seismic
    out and decode the tokens to 70 x 70 logits; the shared `VelocityHead` makes them m/s.

    Position embeddings follow the side: a pretrained file's (`pretrained_path`) or an earlier
    stage's (`init_from`, through a load_state_dict pre-hook) are resampled to this grid.
    """

    model_name = ""  # set by @register
    default_encoder = ""
    default_decoder_channels: tuple[int, ...] | None = None
    options: dict = {}  # layout options (config keys of the model section) -> default

    def __init__(self, encoder: str | None = None, side: int | None = None, drop_path: float = 0.0,
                 pretrained_path: str | None = None):
        super().__init__()
        encoder = self.check_encoder(encoder or self.default_encoder)
        self.side = side or self.options["side"]
        self.encoder = timm.create_model(encoder, pretrained=False, num_classes=0, in_chans=1, img_size=self.side,
                                         drop_path_rate=drop_path)
        patch = self.encoder.patch_embed.patch_size[0]
        if self.side % patch:
            raise ConfigError(f"key 'model.side': {self.side} is not a multiple of {encoder}'s patch size {patch} "
                              f"(e.g. {self.side // patch * patch} or {(self.side // patch + 1) * patch})")
        self.grid = tuple(self.encoder.patch_embed.grid_size)
        self.encoder.register_load_state_dict_pre_hook(_resample_on_load)
        self.encoder_name = encoder
        self.pretrained_path = pretrained_path

    def load_pretrained(self) -> None:
        """Called by subclasses once every module exists (an error then names the whole encoder)."""
        if self.pretrained_path:
            report(load_encoder_weights(self.encoder, self.pretrained_path, self.encoder_name))

    @classmethod
    def check_encoder(cls, encoder: str) -> str:
        return check_vit_encoder(cls.model_name, encoder)

    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        """Patch tokens (B, grid h x w, D) after the encoder's final norm, prefix tokens dropped."""
        return self.encoder.forward_features(images)[:, self.encoder.num_prefix_tokens:]

    def token_map(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, h x w, C) -> (B, C, h, w)."""
        return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], *self.grid)

    def to_encoder_input(self, seismic: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class TokenDecoder(nn.Module):
    """A second transformer as decoder (1st place's): learned queries, one per 7 x 7 patch of the
    70 x 70 map, join the encoder's tokens (projected to the decoder's width) in timm ViT blocks of
    self-attention over both; each query then becomes its patch's 49 logits. `widths` are the
    blocks' token widths (a linear projection where one changes); heads: gcd(width, 8)."""

    patch = 7

    def __init__(self, encoder_dim: int, widths: Sequence[int], drop_path: float = 0.0):
        super().__init__()
        self.cells = MAP_SIZE // self.patch
        self.memory = nn.Linear(encoder_dim, widths[0])
        self.queries = nn.Parameter(torch.zeros(1, self.cells * self.cells, widths[0]))
        nn.init.normal_(self.queries)  # unit scale: each keeps its identity next to what attention adds
        layers, width = [], widths[0]
        for out in widths:
            if out != width:
                layers.append(nn.Linear(width, out))
            layers.append(Block(out, num_heads=math.gcd(out, 8), qkv_bias=True, drop_path=drop_path))
            width = out
        self.blocks = nn.Sequential(*layers)
        self.norm = nn.LayerNorm(width)
        self.to_pixels = nn.Linear(width, self.patch * self.patch)

    def forward(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        batch, queries = tokens.shape[0], self.queries.shape[1]
        x = self.blocks(torch.cat([self.queries.expand(batch, -1, -1), self.memory(tokens)], dim=1))
        pixels = self.to_pixels(self.norm(x[:, :queries]))  # (B, cells^2, 49)
        cells, patch = self.cells, self.patch
        return pixels.reshape(batch, cells, cells, patch, patch).permute(0, 1, 3, 2, 4).reshape(batch, 1, MAP_SIZE, MAP_SIZE)


class ConvDecoder(nn.Module):
    """A convolutional decoder: the token grid as a feature map, then one block (two conv blocks)
    per entry of `channels`, at sizes growing evenly from the grid to 70 x 70, and a 3 x 3
    convolution to one logit. The encoder's global attention can route what each map cell needs
    to any token, so the tiled layout's shots need not sit above their columns."""

    def __init__(self, encoder_dim: int, channels: Sequence[int]):
        super().__init__()
        blocks, width = [], encoder_dim
        for out in channels:
            blocks.append(nn.Sequential(conv_block(width, out), conv_block(out, out)))
            width = out
        self.blocks = nn.ModuleList(blocks)
        self.to_logits = nn.Conv2d(width, 1, kernel_size=3, padding=1)

    def forward(self, features: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        steps = len(self.blocks)
        for index, block in enumerate(self.blocks):
            fraction = (index + 1) / steps
            size = tuple(round(g + (MAP_SIZE - g) * fraction) for g in grid)
            features = block(F.interpolate(features, size=size, mode="bilinear", align_corners=False))
        return self.to_logits(features)


@register("vit_tiled")
class VitTiled(VitLayout):
    """1st place's layout: the five shot gathers side by side along the receiver axis, (T, 5 x 70),
    resized to one square image of `side` (default 350: time 1000 -> 350, receivers unchanged), a
    ViT encoder, and a decoder to 70 x 70: `decoder="transformer"` (`TokenDecoder`, default) or
    `"conv"` (`ConvDecoder`); `decoder_channels` are its blocks' widths."""

    default_encoder = "vit_small_patch14_reg4_dinov2"
    default_decoder_channels = (256, 256, 256, 256)
    options = {"side": 350, "decoder": "transformer"}

    def __init__(self, encoder: str | None = None, width: float = 1.0, head: Literal["sigmoid", "clamp"] = "sigmoid",
                 decoder_channels: Sequence[int] | None = None, drop_path: float = 0.0, pretrained_path: str | None = None,
                 side: int | None = None, decoder: Literal["transformer", "conv"] | None = None):
        super().__init__(encoder, side, drop_path, pretrained_path)
        self.decoder_kind = decoder or self.options["decoder"]
        channels = scaled_channels(decoder_channels or self.default_decoder_channels, width)
        if self.decoder_kind == "transformer":
            self.decoder = TokenDecoder(self.encoder.embed_dim, channels, drop_path)
        elif self.decoder_kind == "conv":
            self.decoder = ConvDecoder(self.encoder.embed_dim, channels)
        else:
            raise ValueError(f"vit_tiled: decoder must be 'transformer' or 'conv', got {decoder!r}")
        self.head = VelocityHead(head)
        self.load_pretrained()

    def to_encoder_input(self, seismic: torch.Tensor) -> torch.Tensor:
        batch, sources, time, receivers = seismic.shape
        tiled = seismic.permute(0, 2, 1, 3).reshape(batch, 1, time, sources * receivers)  # shot k at columns 70k..70k+69
        return resize(tiled, (self.side, self.side))

    def forward(self, seismic: torch.Tensor) -> torch.Tensor:
        tokens = self.tokens(self.to_encoder_input(seismic))
        if self.decoder_kind == "conv":
            tokens = self.token_map(tokens)
        return self.head(self.decoder(tokens, self.grid))


@register("vit_per_source")
class VitPerSource(VitLayout):
    """3rd place's layout: each source's gather (T, 70) folded to (T / 4, 4 x 70) - every 4
    consecutive time samples of a receiver side by side, so receiver x keeps columns 4x..4x+3 -
    and resized to `side` (default 252); the first `shared_blocks` encoder blocks run on each source
    alone (the five share their weights), the sources' tokens are then averaged, and the remaining
    blocks run once. A linear layer makes 16 values per token, PixelShuffle(4) a 4 x grid map
    (72 x 72 at side 252 with 14-pixel patches, cropped to 70 x 70 as the 3rd place did; any other
    size is resized to 70 x 70)."""

    default_encoder = "eva02_small_patch14_224"
    options = {"side": 252, "shared_blocks": 4}
    upscale = 4
    fold = 4  # time samples side by side per receiver

    def __init__(self, encoder: str | None = None, width: float = 1.0, head: Literal["sigmoid", "clamp"] = "sigmoid",
                 drop_path: float = 0.0, pretrained_path: str | None = None, side: int | None = None,
                 shared_blocks: int | None = None):
        super().__init__(encoder, side, drop_path, pretrained_path)
        self.shared_blocks = self.options["shared_blocks"] if shared_blocks is None else shared_blocks
        depth = len(self.encoder.blocks)
        if not 0 <= self.shared_blocks <= depth:
            raise ConfigError(f"key 'model.shared_blocks': {self.shared_blocks} is not between 0 and "
                              f"{self.encoder_name}'s {depth} blocks")
        self.to_subpixels = nn.Linear(self.encoder.embed_dim, self.upscale * self.upscale)
        self.shuffle = nn.PixelShuffle(self.upscale)
        self.head = VelocityHead(head)
        self.load_pretrained()

    def fold_time(self, seismic: torch.Tensor) -> torch.Tensor:
        """(B, 5, T, 70) -> (B, 5, T / 4, 4 x 70): row r, column 4x + k is time 4r + k of receiver x."""
        batch, sources, time, receivers = seismic.shape
        rows = -(-time // self.fold)
        seismic = resize(seismic, (rows * self.fold, receivers))  # a multiple of 4 time samples (1000 already is)
        folded = seismic.reshape(batch, sources, rows, self.fold, receivers).transpose(3, 4)
        return folded.reshape(batch, sources, rows, receivers * self.fold)

    def to_encoder_input(self, seismic: torch.Tensor) -> torch.Tensor:
        """(B, 5, T, 70) -> (B, 5, side, side): each source an image."""
        return resize(self.fold_time(seismic), (self.side, self.side))

    def run_blocks(self, x: torch.Tensor, rope, blocks: range) -> torch.Tensor:
        for index in blocks:
            block = self.encoder.blocks[index]
            if rope is None:  # VisionTransformer blocks
                x = block(x)
            else:  # EVA blocks take the rotary embedding (per block in timm's "mixed" RoPE mode)
                x = block(x, rope=rope[index] if getattr(self.encoder, "rope_mixed", False) else rope)
        return x

    def forward(self, seismic: torch.Tensor) -> torch.Tensor:
        images = self.to_encoder_input(seismic)
        batch, sources = images.shape[:2]
        x = self.encoder.patch_embed(images.reshape(batch * sources, 1, self.side, self.side))
        x = self.encoder._pos_embed(x)  # EVA also returns its rotary embedding
        x, rope = x if isinstance(x, tuple) else (x, None)
        x = self.encoder.norm_pre(x)
        x = self.run_blocks(x, rope, range(self.shared_blocks))
        x = x.reshape(batch, sources, *x.shape[1:]).mean(dim=1)
        x = self.run_blocks(x, rope, range(self.shared_blocks, len(self.encoder.blocks)))
        tokens = self.encoder.norm(x)[:, self.encoder.num_prefix_tokens:]
        pixels = self.shuffle(self.token_map(self.to_subpixels(tokens)))
        size = pixels.shape[-1]
        if size == MAP_SIZE + 2:
            pixels = pixels[..., 1:-1, 1:-1]
        elif size != MAP_SIZE:
            pixels = F.interpolate(pixels, size=(MAP_SIZE, MAP_SIZE), mode="bilinear", align_corners=False, antialias=True)
        return self.head(pixels)


# ---- the factory ------------------------------------------------------------------------------------

# The models that take an encoder (and the encoder options below): those with a check_encoder.
ENCODER_MODELS: dict[str, type[nn.Module]] = {name: model for name, model in MODELS.items() if hasattr(model, "check_encoder")}


def known_models() -> list[str]:
    return MODELS.names()


def create_model(name: str, **kwargs) -> nn.Module:
    """The model registered as `name`, built with `kwargs` (width, head; the encoder models also
    encoder, decoder_channels, drop_path, pretrained_path; the ViT layouts side and decoder /
    shared_blocks); ValueError for an unknown name."""
    return MODELS.create(name, **kwargs)


# The config's encoder options, checked and filled in with the model's defaults, so a saved config
# names the encoder it was trained with. Each gets the already validated model name (None when
# that was invalid: nothing more to say then).


def _encoder_option(model_name: str | None, key: str, value):
    """The model class that takes option `key`, or None when there is nothing to check."""
    if model_name in ENCODER_MODELS:
        return ENCODER_MODELS[model_name]
    if model_name in MODELS and value is not None:
        raise ValueError(f"{model_name} has no encoder; {key} applies to {', '.join(sorted(ENCODER_MODELS))}")
    return None


def resolve_encoder(model_name: str | None, encoder: str | None) -> str | None:
    model = _encoder_option(model_name, "encoder", encoder)
    return encoder if model is None else model.check_encoder(encoder or model.default_encoder)


def resolve_decoder_channels(model_name: str | None, channels: list[int] | None) -> list[int] | None:
    model = _encoder_option(model_name, "decoder_channels", channels)
    if model is None:
        return channels
    if model.default_decoder_channels is None:  # vit_per_source: a linear layer and PixelShuffle
        if channels is not None:
            raise ValueError(f"{model_name} has no decoder blocks (a linear layer and PixelShuffle); leave decoder_channels unset")
        return None
    channels = list(channels or model.default_decoder_channels)
    if issubclass(model, VitLayout):  # any number of decoder blocks
        if not channels or min(channels) < 1:
            raise ValueError(f"{model_name} needs one or more positive decoder widths, got {channels}")
        return channels
    wanted = len(model.default_decoder_channels)
    if len(channels) != wanted or min(channels) < 1:
        raise ValueError(f"{model_name} needs {wanted} positive decoder channels (deepest first), got {channels}")
    return channels


LAYOUT_MODELS = sorted(name for name, model in MODELS.items() if getattr(model, "options", None))


def resolve_layout_option(model_name: str | None, key: str, value):
    """A ViT layout's option (side, decoder, shared_blocks), filled in with the model's default;
    refused for a model without it."""
    model = MODELS.get(model_name) if model_name in MODELS else None
    options = getattr(model, "options", {})
    if key in options:
        return options[key] if value is None else value
    if model is not None and value is not None:
        owners = [name for name in LAYOUT_MODELS if key in MODELS.get(name).options]
        raise ValueError(f"{model_name} has no option {key}; it applies to {', '.join(owners)}")
    return value


def resolve_drop_path(model_name: str | None, encoder: str | None, drop_path: float | None) -> float | None:
    model = _encoder_option(model_name, "drop_path", drop_path)
    if model is None:
        return drop_path
    if drop_path and model is SmpUNet and encoder and not encoder.startswith("tu-"):
        raise ValueError(f"unet: drop_path needs a timm encoder ('tu-{encoder}'), got encoder {encoder!r}")
    return drop_path or 0.0


def check_pretrained_path(model_name: str | None, path: str | None) -> str | None:
    _encoder_option(model_name, "pretrained_path", path)
    return path
