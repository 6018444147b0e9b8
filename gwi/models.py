"""Models that map seismic shot gathers (B, 5, T, 70) to velocity maps (B, 1, 70, 70) in m/s, and a
factory that builds them by name (`create_model`), so a config picks the model with `model.name`.

    inversionnet    InversionNet (OpenFWI): plain convolutional encoder-decoder, no pretrained parts
    unet            segmentation-models-pytorch Unet on the seismic resized to 256 x 256
    hgnet_unet      timm HGNet-v2 encoder on the seismic resized to 280 x 280, UNet decoder to 70 x 70
    convnext_unet   timm ConvNeXt encoder behind a stem that reads every time sample, UNet decoder
    caformer_unet   the same with a timm CAFormer (or ConvFormer) encoder

Every model ends in the same `VelocityHead`. The encoder models are built with random weights
(nothing is ever downloaded); `pretrained_path` loads encoder weights from a local file
(`load_encoder_weights`), e.g. a timm or torchvision ImageNet checkpoint uploaded as a Kaggle dataset.
"""
from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Literal, Sequence

import segmentation_models_pytorch as smp
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from timm.models import adapt_input_conv
from torch import nn

from gwi.layout import MAP_SIZE, SOURCE_X, VELOCITY_MAX, VELOCITY_MIN
from harness.errors import UserError, is_local_main_process
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
    A first convolution trained on 3 (or 1) input channels is adapted to the 5 sources (timm's
    `adapt_input_conv`). Tensors of the modules in `replaced` (a stem this project swapped for its
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

    loaded, adapted, skipped, ignored, unexpected, mismatched, problems_of_shape = {}, [], [], [], [], [], []
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
        summary += f"; {_examples(adapted)} adapted to {SEISMIC_CHANNELS} input channels"
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


# ---- the factory ------------------------------------------------------------------------------------

# The models that take an encoder (and the encoder options below): those with a check_encoder.
ENCODER_MODELS: dict[str, type[nn.Module]] = {name: model for name, model in MODELS.items() if hasattr(model, "check_encoder")}


def known_models() -> list[str]:
    return MODELS.names()


def create_model(name: str, **kwargs) -> nn.Module:
    """The model registered as `name`, built with `kwargs` (width, head; the encoder models also
    encoder, decoder_channels, drop_path, pretrained_path); ValueError for an unknown name."""
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
    channels = list(channels or model.default_decoder_channels)
    wanted = len(model.default_decoder_channels)
    if len(channels) != wanted or min(channels) < 1:
        raise ValueError(f"{model_name} needs {wanted} positive decoder channels (deepest first), got {channels}")
    return channels


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
