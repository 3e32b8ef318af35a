"""The trunk networks: one crop in, one embedding out.

The Siamese "twins" share these weights; only the trunk is exported, the
station compares its embedding with the mean embedding of good parts.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from station.errors import ConfigError, ModelError
from station.preprocess import InputSpec

ARCHS = ("mlp", "cnn")
# The layout each architecture consumes; written into the model's metadata.
ARCH_LAYOUT = {"mlp": "flat", "cnn": "nchw"}


class MlpTrunk(nn.Module):
    """The source study's reference: flatten 936 -> 512 ReLU -> 256 ReLU -> 128 linear."""

    def __init__(self, input_size: int, embedding_dim: int = 128):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(input_size, 512), nn.ReLU(),
            nn.Linear(512, 256), nn.ReLU(),
            nn.Linear(256, embedding_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class CnnTrunk(nn.Module):
    """Three 3x3 conv blocks, each halving the crop, then one linear layer.

    The linear head keeps where a feature is (no global pooling): defects are
    partial, a scratch in one corner must not average away. About 93k
    parameters for a 36x26 crop, most of them in the head.
    """

    def __init__(self, height: int, width: int, embedding_dim: int = 128):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 48, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        with torch.no_grad():
            flat_size = self.features(torch.zeros(1, 1, height, width)).numel()
        if flat_size == 0:
            raise ConfigError(f"a {width}x{height} crop is too small for the cnn trunk (at least 8x8)")
        self.head = nn.Linear(flat_size, embedding_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.features(x), 1))


def input_spec_for(arch: str, width: int = 36, height: int = 26) -> InputSpec:
    """The preprocessing an architecture is trained and exported with."""
    check_arch(arch)
    return InputSpec(width=width, height=height, layout=ARCH_LAYOUT[arch])


def check_arch(arch: str):
    if arch not in ARCHS:
        raise ConfigError(f"unknown architecture {arch!r}: choose one of {', '.join(ARCHS)}")


def build_trunk(arch: str, embedding_dim: int = 128, spec: InputSpec | None = None) -> nn.Module:
    """A freshly initialised trunk (torch's default init; seed torch first for repeatability)."""
    check_arch(arch)
    if embedding_dim < 1:
        raise ConfigError(f"embedding dimension {embedding_dim} must be at least 1")
    spec = spec or input_spec_for(arch)
    if arch == "mlp":
        return MlpTrunk(spec.width * spec.height, embedding_dim)
    return CnnTrunk(spec.height, spec.width, embedding_dim)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---- checkpoints: a state_dict plus plain data, loadable with weights_only=True

CHECKPOINT_FORMAT = "station-trunk/1"
CHECKPOINT_KEYS = ("format", "state_dict", "arch", "embedding_dim", "input_spec")


def save_checkpoint(path, model: nn.Module, arch: str, embedding_dim: int, spec: InputSpec, **info):
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
        "input_spec": {
            "width": spec.width, "height": spec.height,
            "layout": spec.layout, "pixel_scale": float(spec.pixel_scale),
        },
        **info,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    torch.save(checkpoint, partial)
    os.replace(partial, path)  # a crash never leaves half a checkpoint under the real name


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
    model = build_trunk(checkpoint["arch"], checkpoint["embedding_dim"], spec)
    try:
        model.load_state_dict(checkpoint["state_dict"])
    except RuntimeError as exc:
        raise ModelError(f"{path}: weights do not fit a {checkpoint['arch']} trunk: {exc}") from exc
    model.eval()
    info = {key: value for key, value in checkpoint.items() if key != "state_dict"}
    return model, info
