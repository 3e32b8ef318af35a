"""The trunk networks: one crop in, one embedding out.

The Siamese "twins" share these weights; only the trunk is exported, the
station compares its embedding with the mean embedding of good parts.
"""

from __future__ import annotations

import copy
import hashlib
import math
import os
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

from station.core.errors import ConfigError, ModelError
from station.core.preprocess import InputSpec

ARCHS = ("mlp", "cnn", "lite0", "lite0ft")
# The layout each architecture consumes; written into the model's metadata.
ARCH_LAYOUT = {"mlp": "flat", "cnn": "nchw", "lite0": "nchw", "lite0ft": "nchw"}
PRETRAINED_ARCHS = ("lite0", "lite0ft")


# Trunk options stored in every checkpoint ("trunk_options"). Checkpoints
# written before the options existed load with LEGACY_TRUNK_OPTIONS.
DEFAULT_TRUNK_OPTIONS = {"batchnorm": True, "standardize": True, "l2_normalize": True}
LEGACY_TRUNK_OPTIONS = {"batchnorm": False, "standardize": False, "l2_normalize": False}
STANDARDIZE_EPS = 0.02  # in pixel_scale units (~5 grey levels): a flat crop is not blown up into noise


L2_NORM_FLOOR = 1e-6  # an all-zero embedding stays zero instead of becoming NaN


def standardize(x: torch.Tensor, sample_shape: tuple[int, ...]) -> torch.Tensor:
    """Per-crop zero mean, unit spread: the trunk sees the part, not the lamp.

    Part of the exported graph, so the station's preprocessing stays the one
    in station/preprocess.py. A layer norm without weights over the whole
    crop is exactly (x - mean) / sqrt(var + eps^2), and exports as ONE
    LayerNormalization node; the constant `sample_shape` keeps shape
    arithmetic out of the graph (12 small nodes cost ~7 us per part).
    """
    return nn.functional.layer_norm(x, sample_shape, eps=STANDARDIZE_EPS**2)


def unit_length(out: torch.Tensor) -> torch.Tensor:
    """Unit-length embeddings: the margins mean the same for any trunk and data."""
    return out / torch.linalg.vector_norm(out, dim=1, keepdim=True).clamp_min(L2_NORM_FLOOR)


class _Trunk(nn.Module):
    standardize_input = False
    l2_normalize = False
    sample_shape: tuple[int, ...] = ()

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.standardize_input:
            x = standardize(x, self.sample_shape)
        out = self.embed(x)
        return unit_length(out) if self.l2_normalize else out


class MlpTrunk(_Trunk):
    """The source study's reference: flatten 936 -> 512 ReLU -> 256 ReLU -> 128 linear."""

    def __init__(
        self,
        input_size: int,
        embedding_dim: int = 128,
        batchnorm: bool = False,
        standardize: bool = False,
        l2_normalize: bool = False,
    ):
        super().__init__()
        self.standardize_input, self.l2_normalize = standardize, l2_normalize
        self.sample_shape = (input_size,)

        def norm(width):
            return [nn.BatchNorm1d(width)] if batchnorm else []

        self.layers = nn.Sequential(
            nn.Linear(input_size, 512),
            *norm(512),
            nn.ReLU(),
            nn.Linear(512, 256),
            *norm(256),
            nn.ReLU(),
            nn.Linear(256, embedding_dim),
        )

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class CnnTrunk(_Trunk):
    """Three 3x3 conv blocks, each halving the crop, then one linear layer.

    The linear head keeps where a feature is (no global pooling): defects are
    partial, a scratch in one corner must not average away. About 93k
    parameters for a 36x26 crop, most of them in the head.
    """

    def __init__(
        self,
        height: int,
        width: int,
        embedding_dim: int = 128,
        batchnorm: bool = False,
        standardize: bool = False,
        l2_normalize: bool = False,
    ):
        super().__init__()
        self.standardize_input, self.l2_normalize = standardize, l2_normalize
        self.sample_shape = (1, height, width)

        def block(c_in, c_out):
            # BatchNorm folds into the conv on export: free at inference.
            norm = [nn.BatchNorm2d(c_out)] if batchnorm else []
            return [nn.Conv2d(c_in, c_out, 3, padding=1), *norm, nn.ReLU(), nn.MaxPool2d(2)]

        self.features = nn.Sequential(*block(1, 16), *block(16, 32), *block(32, 48))
        with torch.no_grad():
            flat_size = self.features(torch.zeros(1, 1, height, width)).numel()
        if flat_size == 0:
            raise ConfigError(f"a {width}x{height} crop is too small for the cnn trunk (at least 8x8)")
        self.head = nn.Linear(flat_size, embedding_dim)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.features(x), 1))


class PretrainedTrunk(_Trunk):
    """EfficientNet-Lite0's ImageNet features at stride 16 (export/backbone.py), frozen, under a trained head.

    The head reads the feature map through a 1x1 and a 3x3 convolution and keeps each channel's
    strongest response anywhere on the map beside its mean: a defect in one corner is not averaged
    away. Only the head trains; the backbone stays in eval mode (its BatchNorm statistics are
    ImageNet's) and its weights are the package's, in the checkpoint and the exported graph alike.
    Standardization maps each crop to mean 0.5 and spread 0.2 before the backbone: the trunk sees
    the part, not the lamp, in the range the backbone was trained on.
    """

    CUT = 16
    WIDTH = 128
    MAX_REMEMBERED_BYTES = 1 << 29  # feature maps kept while training: 512 MB (a 96x96 map is ~16 KB)

    def __init__(
        self,
        height: int,
        width: int,
        embedding_dim: int = 128,
        batchnorm: bool = False,
        standardize: bool = False,
        l2_normalize: bool = False,
    ):
        super().__init__()
        from export.backbone import PretrainedFeatures

        self.standardize_input, self.l2_normalize = False, l2_normalize
        self.recentre = standardize
        self.sample_shape = (1, height, width)
        self.backbone = PretrainedFeatures(cut=self.CUT, head="map", frozen=True)

        def conv(c_in, kernel):
            norm = [nn.BatchNorm2d(self.WIDTH)] if batchnorm else []
            return [nn.Conv2d(c_in, self.WIDTH, kernel, padding=kernel // 2), *norm, nn.ReLU()]

        self.head = nn.Sequential(*conv(self.backbone.channels, 1), *conv(self.WIDTH, 3))
        self.project = nn.Linear(2 * self.WIDTH, embedding_dim)
        self._features: dict[bytes, torch.Tensor] = {}  # the backbone's map of each crop seen

    def train(self, mode: bool = True):
        super().train(mode)
        self.backbone.eval()
        return self

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        if self.recentre:
            x = 0.5 + 0.2 * standardize(x, self.sample_shape)
        with torch.no_grad():  # frozen: no gradient is kept for the backbone's activations
            features = self.backbone(x) if torch.jit.is_tracing() else self._remembered(x)
        responses = self.head(features)
        return self.project(torch.cat([responses.amax(dim=(2, 3)), responses.mean(dim=(2, 3))], dim=1))

    def _compute(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def _remembered(self, x: torch.Tensor) -> torch.Tensor:
        """The frozen backbone's map of each crop, computed once: every epoch, and every validation, shows
        the same crops again (export/train.py gives this trunk no augmentation), and the backbone is
        nearly all of the cost. Synthetic anomalies are new each time; at most MAX_REMEMBERED_BYTES of them are kept.
        The exported graph (traced) always runs the backbone."""
        keys = [hashlib.blake2b(row.numpy().tobytes(), digest_size=16).digest() for row in x]
        missing = [i for i, key in enumerate(keys) if key not in self._features]
        if missing:
            computed = self._compute(x[missing])
            room = self.MAX_REMEMBERED_BYTES // max(computed[0].numel() * computed.element_size(), 1)
            if len(self._features) + len(missing) <= room:
                self._features.update((keys[i], computed[j]) for j, i in enumerate(missing))
            fresh = dict(zip(missing, computed))
            return torch.stack([fresh[i] if i in fresh else self._features[key] for i, key in enumerate(keys)])
        return torch.stack([self._features[key] for key in keys])


class FineTunedTrunk(PretrainedTrunk):
    """The pretrained trunk with the backbone's last stage (stride 8 to 16) fine-tuned beside its head.

    ImageNet's early features (edges, textures up to stride 8) stay as they are and are computed once,
    as the frozen trunk's maps are; the stage that composes them into parts of objects learns the
    parts on the line instead, at a tenth of the head's learning rate (export/train.py:
    BACKBONE_LR_SHARE) so a few hundred photos adjust it rather than overwrite it. BatchNorm keeps
    ImageNet's statistics (eval mode): batches of a few dozen similar parts would not estimate them.
    """

    FROZEN_UP_TO = 8  # the stride whose map is kept frozen and remembered

    def __init__(
        self,
        height: int,
        width: int,
        embedding_dim: int = 128,
        batchnorm: bool = False,
        standardize: bool = False,
        l2_normalize: bool = False,
    ):
        super().__init__(height, width, embedding_dim, batchnorm, standardize, l2_normalize)
        self.backbone.split_at(self.FROZEN_UP_TO)[1].requires_grad_(True)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        if self.recentre:
            x = 0.5 + 0.2 * standardize(x, self.sample_shape)
        if torch.jit.is_tracing():
            early = self.backbone.prefix(x, self.FROZEN_UP_TO)
        else:
            with torch.no_grad():
                early = self._remembered(x)
        responses = self.head(self.backbone.suffix(early, self.FROZEN_UP_TO))
        return self.project(torch.cat([responses.amax(dim=(2, 3)), responses.mean(dim=(2, 3))], dim=1))

    def _compute(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone.prefix(x, self.FROZEN_UP_TO)


class Ensemble(nn.Module):
    """Several trunks as one model: their unit embeddings side by side, scaled back to unit length.

    The distance to the mean good embedding is then the members' distances pooled
    (squared Euclidean: their mean), so no member's seed decides alone.
    """

    def __init__(self, members: list[nn.Module]):
        super().__init__()
        self.members = nn.ModuleList(members)
        self.scale = 1.0 / math.sqrt(len(members))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([member(x) for member in self.members], dim=1) * self.scale


def input_spec_for(arch: str, width: int = 36, height: int = 26) -> InputSpec:
    """The preprocessing an architecture is trained and exported with."""
    check_arch(arch)
    return InputSpec(width=width, height=height, layout=ARCH_LAYOUT[arch])


def check_arch(arch: str):
    if arch not in ARCHS:
        raise ConfigError(f"unknown architecture {arch!r}: choose one of {', '.join(ARCHS)}")


def trunk_options(options: dict | None = None) -> dict:
    """DEFAULT_TRUNK_OPTIONS updated with `options`; unknown keys are refused."""
    merged = dict(DEFAULT_TRUNK_OPTIONS)
    unknown = set(options or {}) - set(merged)
    if unknown:
        raise ConfigError(f"unknown trunk option(s) {', '.join(sorted(unknown))}")
    merged.update({k: bool(v) for k, v in (options or {}).items()})
    return merged


def build_trunk(
    arch: str, embedding_dim: int = 128, spec: InputSpec | None = None, options: dict | None = None
) -> nn.Module:
    """A freshly initialised trunk (torch's default init; seed torch first for repeatability)."""
    check_arch(arch)
    if embedding_dim < 1:
        raise ConfigError(f"embedding dimension {embedding_dim} must be at least 1")
    spec = spec or input_spec_for(arch)
    options = trunk_options(options)
    if arch == "mlp":
        return MlpTrunk(spec.width * spec.height, embedding_dim, **options)
    if arch == "lite0":
        return PretrainedTrunk(spec.height, spec.width, embedding_dim, **options)
    if arch == "lite0ft":
        return FineTunedTrunk(spec.height, spec.width, embedding_dim, **options)
    return CnnTrunk(spec.height, spec.width, embedding_dim, **options)


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """An eval-mode copy with every BatchNorm folded into the layer before it.

    The same function, fewer nodes: the exporter folds Conv+BatchNorm itself
    but leaves Linear+BatchNorm1d as two nodes, and the int8 quantizer then
    sees BatchNorm's scale as float work after every matrix product.
    """
    folded = copy.deepcopy(model).eval()
    for parent in folded.modules():
        if isinstance(parent, nn.Sequential):
            _fold_sequential(parent)
    return folded


def _fold_sequential(seq: nn.Sequential):
    for i in range(len(seq) - 1):
        layer, norm = seq[i], seq[i + 1]
        if isinstance(layer, nn.Linear) and isinstance(norm, nn.BatchNorm1d):
            seq[i], seq[i + 1] = fuse_linear_bn_eval(layer, norm), nn.Identity()
        elif isinstance(layer, nn.Conv2d) and isinstance(norm, nn.BatchNorm2d):
            seq[i], seq[i + 1] = fuse_conv_bn_eval(layer, norm), nn.Identity()


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---- checkpoints: a state_dict plus plain data, loadable with weights_only=True

CHECKPOINT_FORMAT = "station-trunk/1"
CHECKPOINT_KEYS = ("format", "state_dict", "arch", "embedding_dim", "input_spec")


def save_checkpoint(
    path, model: nn.Module, arch: str, embedding_dim: int, spec: InputSpec, trunk_options: dict | None = None, **info
):
    """Write the trunk's weights and how to rebuild it; never a pickled module.

    `info` must be plain data (str, int, float, bool, None, lists/dicts of
    those): torch.load(weights_only=True) refuses anything else.
    """
    path = Path(path)
    checkpoint = {
        "format": CHECKPOINT_FORMAT,
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "arch": arch,
        "embedding_dim": int(embedding_dim),
        "trunk_options": dict(trunk_options if trunk_options is not None else _options_of(model)),
        "input_spec": {
            "width": spec.width,
            "height": spec.height,
            "layout": spec.layout,
            "pixel_scale": float(spec.pixel_scale),
        },
        **info,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    torch.save(checkpoint, partial)
    os.replace(partial, path)  # a crash never leaves half a checkpoint under the real name


def _options_of(model: nn.Module) -> dict:
    return {
        "batchnorm": any(isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) for m in model.modules()),
        "standardize": bool(getattr(model, "standardize_input", False)),
        "l2_normalize": bool(getattr(model, "l2_normalize", False)),
    }


def load_checkpoint(path) -> tuple[nn.Module, dict]:
    """(trunk in eval mode, the checkpoint's plain data without the weights)."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: checkpoint not found")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle/zip errors of many kinds
        raise ModelError(f"{path}: not a trunk checkpoint written by `station train` ({exc})") from exc
    missing = [key for key in CHECKPOINT_KEYS if not isinstance(checkpoint, dict) or key not in checkpoint]
    if missing or checkpoint["format"] != CHECKPOINT_FORMAT:
        raise ModelError(f"{path}: not a {CHECKPOINT_FORMAT} checkpoint (missing {', '.join(missing) or 'format'})")
    spec = InputSpec(**checkpoint["input_spec"])
    options = checkpoint.get("trunk_options", LEGACY_TRUNK_OPTIONS)
    members = int(checkpoint.get("members", 1))  # checkpoints before ensembles hold one trunk
    if members > 1:
        model = Ensemble(
            [
                build_trunk(checkpoint["arch"], checkpoint["embedding_dim"] // members, spec, options)
                for _ in range(members)
            ]
        )
    else:
        model = build_trunk(checkpoint["arch"], checkpoint["embedding_dim"], spec, options)
    try:
        model.load_state_dict(checkpoint["state_dict"])
    except RuntimeError as exc:
        raise ModelError(f"{path}: weights do not fit a {checkpoint['arch']} trunk: {exc}") from exc
    model.eval()
    info = {key: value for key, value in checkpoint.items() if key != "state_dict"}
    return model, info
