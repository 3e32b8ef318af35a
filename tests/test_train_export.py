"""Train -> export -> onnxruntime, with real torch, real files, real sessions."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the train extra is not installed")

from export import onnx_export  # noqa: E402
from export.onnx_export import ExportOptions, export_model, report_path  # noqa: E402
from export.losses import center_loss  # noqa: E402
from export.train import DEFAULT_LOSS, TrainConfig, train  # noqa: E402
from export.trunk import (  # noqa: E402
    DEFAULT_TRUNK_OPTIONS,
    LEGACY_TRUNK_OPTIONS,
    build_trunk,
    input_spec_for,
    load_checkpoint,
    save_checkpoint,
)
from station.cli import main  # noqa: E402
from station.core.embedder import OPTIONAL_METADATA, REQUIRED_METADATA, Embedder  # noqa: E402
from station.core.errors import DataError, ExportGateError  # noqa: E402
from station.core.imagefolder import dataset_fingerprint, read_image, scan_dataset  # noqa: E402
from tests.onnx_models import embed_frames, model_input  # noqa: E402

TINY_EPOCHS = 2


@pytest.fixture(scope="module")
def checkpoints(sim_dataset, tmp_path_factory):
    """One briefly trained checkpoint per architecture (shared, read only)."""
    folder = tmp_path_factory.mktemp("checkpoints")
    return {
        arch: train(
            sim_dataset, folder / f"{arch}.pt", TrainConfig(arch=arch, epochs=TINY_EPOCHS, members=1), progress=False
        )
        for arch in ("mlp", "cnn")
    }


def images_of(dataset, limit=64):
    items = scan_dataset(dataset)
    step = max(1, len(items) // limit)
    return [read_image(item.path) for item in items[::step]]


def torch_embeddings(model, images, spec):
    with torch.no_grad():
        return model(torch.from_numpy(model_input(images, spec))).numpy()


def test_checkpoint_is_plain_data_that_loads_with_weights_only(checkpoints, sim_dataset):
    path = checkpoints["cnn"].checkpoint
    checkpoint = torch.load(path, weights_only=True)
    assert checkpoint["arch"] == "cnn" and checkpoint["embedding_dim"] == 128 and checkpoint["members"] == 1
    assert checkpoint["input_spec"] == {"width": 36, "height": 26, "layout": "nchw", "pixel_scale": 1.0 / 255.0}
    assert checkpoint["loss"] == DEFAULT_LOSS and checkpoint["epochs"] == TINY_EPOCHS
    assert checkpoint["trunk_options"] == DEFAULT_TRUNK_OPTIONS and checkpoint["seed"] == 0
    assert checkpoint["data_fingerprint"] == dataset_fingerprint(scan_dataset(sim_dataset), sim_dataset)
    assert checkpoint["data_path"] == str(sim_dataset.resolve())
    assert 0.0 <= checkpoint["val_pair_accuracy"] <= 1.0
    assert checkpoint["val_pair_accuracy"] == checkpoints["cnn"].val_pair_accuracy
    assert isinstance(checkpoint["station_version"], str)
    assert all(isinstance(v, torch.Tensor) for v in checkpoint["state_dict"].values())
    # The validation split is stratified: every class keeps some of its images for validation.
    assert checkpoint["n_val"] >= len({item.defect_class for item in scan_dataset(sim_dataset)})


def test_training_is_deterministic_for_a_seed(sim_dataset, tmp_path):
    def weights(name, seed):
        train(sim_dataset, tmp_path / name, TrainConfig(arch="mlp", epochs=1, seed=seed), progress=False)
        return torch.load(tmp_path / name, weights_only=True)["state_dict"]

    first, again, other = weights("a.pt", 5), weights("b.pt", 5), weights("c.pt", 6)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


def test_triplet_training_with_the_mean_image_anchor_learns(sim_dataset, tmp_path):
    result = train(sim_dataset, tmp_path / "t.pt", TrainConfig(arch="cnn", loss="triplet", epochs=10), progress=False)
    # Half the validation pairs are good-defect: chance is 0.5.
    assert result.val_pair_accuracy > 0.6


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_fp32_export_runs_in_the_embedder_like_torch(checkpoints, sim_dataset, tmp_path, arch):
    out = tmp_path / f"{arch}.onnx"
    report = export_model(checkpoints[arch].checkpoint, out, ExportOptions(fp32=True))
    embedder = Embedder(out)
    model, info = load_checkpoint(checkpoints[arch].checkpoint)
    assert embedder.input_spec == input_spec_for(arch)
    assert embedder.info.quantization == "fp32" and embedder.info.arch == arch
    images = images_of(sim_dataset)
    onnx_emb = embed_frames(embedder, images)
    assert onnx_emb.shape == (len(images), 128)
    assert np.max(np.abs(onnx_emb - torch_embeddings(model, images, embedder.input_spec))) <= 1e-4
    assert report["gate"]["int8"] is None and report["passed"]


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_the_exported_graph_has_no_shape_arithmetic_or_batchnorm(checkpoints, tmp_path, arch):
    """Standardization is one LayerNormalization, BatchNorm is folded: small nodes cost time per part."""
    import onnx

    out = tmp_path / f"{arch}.onnx"
    export_model(checkpoints[arch].checkpoint, out, ExportOptions(fp32=True))
    ops = [node.op_type for node in onnx.load(str(out)).graph.node]
    assert ops.count("LayerNormalization") == 1
    assert not {"BatchNormalization", "Shape", "Gather", "ReduceMean", "Pow"} & set(ops)
    assert ops.count("Gemm") + ops.count("MatMul") == (3 if arch == "mlp" else 1)


def test_int8_export_passes_the_gate_and_reports_its_figures(checkpoints, sim_dataset, tmp_path):
    out = tmp_path / "models" / "trunk.onnx"
    export_model(checkpoints["mlp"].checkpoint, out)
    report = json.loads(report_path(out).read_text())
    assert report_path(out).name == "trunk.export.json"
    assert report["passed"] and report["failures"] == []
    assert report["quantization"] == f"int8-{onnx_export.DEFAULT_INT8}"
    int8 = report["gate"]["int8"]
    assert int8["cosine_mean"] >= onnx_export.MIN_MEAN_COSINE and int8["cosine_min"] <= int8["cosine_mean"]
    assert int8["verdict_agreement"] >= onnx_export.MIN_VERDICT_AGREEMENT
    assert report["gate"]["torch_vs_fp32_max_abs_diff"] <= 1e-4
    assert report["sample"]["images"] == len(scan_dataset(sim_dataset))
    assert 0 < report["size"]["int8_bytes"] < report["size"]["fp32_bytes"]
    assert report["size"]["int8_bytes"] == out.stat().st_size
    assert report["latency"]["fp32_batch1_ms"] > 0 and report["latency"]["int8_batch1_ms"] > 0
    # The sample and training folders are under the test's temp folder: the report names neither.
    assert tempfile.gettempdir() not in report_path(out).read_text()
    assert report["sample"]["data"] is None and report["checkpoint"]["data_path"] is None

    embedder = Embedder(out)
    metadata = dict(embedder.session.get_modelmeta().custom_metadata_map)
    assert set(REQUIRED_METADATA + OPTIONAL_METADATA) <= set(metadata)
    assert metadata == report["metadata"]
    assert metadata["quantization"] == report["quantization"] == embedder.info.quantization
    assert metadata["data_fingerprint"] == dataset_fingerprint(scan_dataset(sim_dataset), sim_dataset)
    assert metadata["created"].endswith("+00:00")
    # Only the model and its report beside it: the work folder is gone.
    assert sorted(p.name for p in out.parent.iterdir()) == ["trunk.export.json", "trunk.onnx"]


def test_static_int8_quantizes_the_layers_and_leaves_the_normalization_float(sim_dataset, tmp_path):
    """What static int8 does to the graph, on fixed weights and without the gate's verdict."""
    import onnx

    from export.dataset import load_crops, model_batch

    torch.manual_seed(0)
    spec = input_spec_for("cnn")
    fp32, out = tmp_path / "fp32.onnx", tmp_path / "cnn-static.onnx"
    onnx_export.export_fp32(build_trunk("cnn", 128, spec).eval(), spec, fp32)
    goods = [item for item in scan_dataset(sim_dataset) if not item.is_defect][:64]
    calib = model_batch(load_crops(goods, spec).crops, spec)
    onnx_export.quantize(fp32, out, "static", calib, reduce_range=False)
    nodes = onnx.load(str(out)).graph.node
    made_by = {output: node.op_type for node in nodes for output in node.output}
    convs = [node for node in nodes if node.op_type == "Conv"]
    assert len(convs) == 3 and all(made_by[node.input[1]] == "DequantizeLinear" for node in convs)  # int8 weights
    # Standardization and unit length compute in float on float inputs.
    normalizing = [node for node in nodes if node.op_type in ("LayerNormalization", "ReduceL2", "Clip", "Div")]
    assert len(normalizing) == 4
    assert all(made_by.get(name) != "DequantizeLinear" for node in normalizing for name in node.input)
    assert made_by["embedding"] != "DequantizeLinear"  # the embedding stays float


def drifting_checkpoint(path, data_dir):
    """An mlp trunk whose first layer holds one hidden unit with huge weights.

    The unit feeds nothing (its outgoing weights are zero), so the float
    model is unharmed; but the outliers set the int8 scale of the whole
    weight tensor and of the activations, and int8 rounds everything else away.
    """
    torch.manual_seed(0)
    spec = input_spec_for("mlp")
    model = build_trunk("mlp", 128, spec, LEGACY_TRUNK_OPTIONS)
    first, second = model.layers[0], model.layers[2]
    with torch.no_grad():
        first.weight[0] = 1e4
        second.weight[:, 0] = 0.0
    save_checkpoint(path, model, "mlp", 128, spec, data_path=str(data_dir), data_fingerprint="")
    return path


@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_a_drifting_int8_model_is_refused_and_nothing_is_left_at_out(sim_dataset, tmp_path, mode):
    checkpoint = drifting_checkpoint(tmp_path / "drift.pt", sim_dataset)
    out = tmp_path / "models" / "drift.onnx"
    with pytest.raises(ExportGateError, match="int8 mean cosine") as refused:
        export_model(checkpoint, out, ExportOptions(int8=mode))
    assert "nothing written" in str(refused.value)
    assert not out.exists()
    assert [p.name for p in out.parent.iterdir()] == ["drift.export.json"]
    report = json.loads(report_path(out).read_text())
    assert not report["passed"] and report["gate"]["int8"]["cosine_mean"] < onnx_export.MIN_MEAN_COSINE
    # The same weights in float are fine: the drift is int8's doing.
    export_model(checkpoint, out, ExportOptions(fp32=True))
    assert Embedder(out).info.quantization == "fp32"


def test_int8_without_calibration_data_says_what_to_pass(tmp_path):
    spec = input_spec_for("mlp")
    checkpoint = tmp_path / "moved.pt"
    save_checkpoint(checkpoint, build_trunk("mlp", 128, spec), "mlp", 128, spec, data_path=str(tmp_path / "gone"))
    with pytest.raises(DataError, match="--calib-data"):
        export_model(checkpoint, tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


def test_cli_train_then_export_end_to_end(sim_dataset, tmp_path, capsys):
    checkpoint, model = tmp_path / "trunk.pt", tmp_path / "model.onnx"
    assert (
        main(
            [
                "train",
                "--data",
                str(sim_dataset),
                "--out",
                str(checkpoint),
                "--arch",
                "cnn",
                "--epochs",
                "1",
                "--seed",
                "3",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "validation pair accuracy" in out and str(checkpoint) in out
    assert main(["export", str(checkpoint), "--out", str(model), "--calib-data", str(sim_dataset)]) == 0
    out = capsys.readouterr().out
    assert "verdict agreement" in out and "batch-1 latency" in out
    embedder = Embedder(model)
    assert embedder.info.arch == "cnn" and embedder.input_spec.layout == "nchw"
    assert embedder.info.extra["members"] == "3"  # the default: an ensemble of three trunks
    assert embed_frames(embedder, images_of(sim_dataset, 8)).shape == (8, 3 * 128)


def test_cli_refuses_a_drifting_model_with_a_message(sim_dataset, tmp_path, capsys):
    checkpoint = drifting_checkpoint(tmp_path / "drift.pt", sim_dataset)
    model = tmp_path / "model.onnx"
    assert main(["export", str(checkpoint), "--out", str(model)]) == ExportGateError.exit_code
    assert "export refused" in capsys.readouterr().err
    assert not model.exists()


# -- the defaults chosen for real parts (docs/quality.md) ---------------------------------


def test_center_loss_is_zero_only_when_goods_meet_and_defects_clear_the_margin():
    good = torch.zeros(4, 8)
    far = torch.zeros(3, 8)
    far[:, 0] = 1.5
    assert center_loss(good, far).item() == pytest.approx(0.0, abs=1e-6)
    near = far * 0.5  # defects inside the margin of 1
    assert center_loss(good, near).item() == pytest.approx((1 - 0.75) ** 2, rel=1e-3)
    spread = good.clone()
    spread[0, 1], spread[1, 1] = 1.0, -1.0  # mean stays at 0; two goods at distance 1
    assert center_loss(spread, far).item() == pytest.approx(0.5, rel=1e-3)


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_default_trunk_gives_unit_embeddings_independent_of_the_lamp(arch):
    torch.manual_seed(0)
    model = build_trunk(arch).eval()
    spec = input_spec_for(arch)
    crops = torch.rand((5,) + spec.sample_shape) * 0.5 + 0.2
    with torch.no_grad():
        emb = model(crops)
        relit = model(crops * 1.2 + 0.05)  # brighter lamp, more gain
    assert torch.allclose(emb.norm(dim=1), torch.ones(5), atol=1e-5)
    assert torch.max(torch.abs(emb - relit)).item() < 1e-2


def test_a_checkpoint_without_trunk_options_loads_the_old_trunk(tmp_path):
    spec = input_spec_for("cnn")
    legacy = build_trunk("cnn", 128, spec, LEGACY_TRUNK_OPTIONS)
    path = tmp_path / "old.pt"
    save_checkpoint(path, legacy, "cnn", 128, spec)
    checkpoint = torch.load(path, weights_only=True)
    assert checkpoint["trunk_options"] == LEGACY_TRUNK_OPTIONS
    del checkpoint["trunk_options"]  # as written before the options existed
    torch.save(checkpoint, path)
    model, _ = load_checkpoint(path)
    x = torch.rand(2, 1, 26, 36)
    with torch.no_grad():
        assert torch.equal(model(x), legacy.eval()(x))


def test_an_exported_dynamic_int8_model_judges_each_part_alone_even_when_batched(checkpoints, sim_dataset, tmp_path):
    """The model itself, called with a batch by anyone, gives each part its batch-of-one embedding."""
    out = tmp_path / "mlp.onnx"
    export_model(checkpoints["mlp"].checkpoint, out, ExportOptions(int8="dynamic"))
    embedder = Embedder(out)
    assert embedder.info.extra["batch_independent"] == "true"
    batch = model_input(images_of(sim_dataset, limit=24), embedder.input_spec)
    spike = np.zeros_like(batch[:1])
    spike.reshape(-1)[0] = 1.0  # one bright pixel: ~30 after standardization, it widens a batch's int8 range
    batch = np.concatenate([batch, spike])
    whole = embedder.session.run(None, {"input": batch})[0]  # one call, a scale per part (export/per_row.py)
    for i in range(len(batch)):
        np.testing.assert_array_equal(whole[i], embedder.session.run(None, {"input": batch[i : i + 1]})[0][0])
    np.testing.assert_array_equal(embedder.embed(batch), whole)
    assert embedder.embed(batch[:0]).shape == (0, 128)


def test_a_part_gets_the_same_int8_embedding_whatever_else_is_in_its_batch(tmp_path, sim_dataset):
    """Dynamic int8 scales activations per input tensor: the embedder must not let batch neighbours in."""
    from station.core.embedder import Embedder
    from station.core.imagefolder import list_images, read_image
    from tests.onnx_models import projection_model
    from onnxruntime.quantization import QuantType, quantize_dynamic
    import onnx

    fp32 = projection_model(tmp_path / "fp32.onnx", embedding_dim=32)
    int8 = tmp_path / "int8.onnx"
    quantize_dynamic(str(fp32), str(int8), weight_type=QuantType.QInt8)
    model = onnx.load(str(int8))
    for prop in model.metadata_props:
        if prop.key == "quantization":
            prop.value = "int8-dynamic"
    onnx.save(model, str(int8))
    embedder = Embedder(int8)
    batch = model_input([read_image(p) for p in list_images(sim_dataset)[:40]], embedder.input_spec)
    whole = embedder.embed(batch)
    alone = np.concatenate([embedder.embed(batch[i : i + 1]) for i in range(len(batch))])
    with_bright_neighbour = embedder.embed(np.concatenate([batch[:1], np.ones_like(batch[:1]) * 3.0]))[0]
    np.testing.assert_array_equal(whole, alone)
    np.testing.assert_array_equal(with_bright_neighbour, alone[0])
    np.testing.assert_array_equal(alone[0], embedder.session.run(None, {"input": batch[:1]})[0][0])
    raw = embedder.session.run(None, {"input": np.concatenate([batch[:1], np.ones_like(batch[:1]) * 3.0])})[0][0]
    assert np.abs(raw - alone[0]).max() > 1e-4  # the effect the embedder guards against is real


def test_calibrating_on_the_training_folder_sets_the_trained_parts_aside(checkpoints, sim_dataset, tmp_path, capsys):
    """The user's three-command path: train, export and calibrate on one folder. The model names the
    photos it trained on; calibration sets them aside (their scores are too tight) or says it cannot."""
    from pathlib import Path

    from station.core import reference_set

    model = tmp_path / "model.onnx"
    export_model(checkpoints["mlp"].checkpoint, model, ExportOptions(fp32=True, calib_data=sim_dataset))
    trained = set(Embedder(model).info.extra["trained_on"].split(","))
    assert len(trained) > 100  # every training photo, by digest
    defects = [str(p) for p in sim_dataset.iterdir() if p.is_dir() and p.name != "good"]
    arguments = [
        "calibrate",
        "--model",
        str(model),
        "--good",
        str(sim_dataset / "good"),
        *sum((["--defects", d] for d in defects), []),
        "--product",
        "A",
    ]
    assert main([*arguments, "--out", str(tmp_path / "aside"), "--min-good", "10"]) == 0
    err = capsys.readouterr().err
    assert "trained the model: set aside; thresholds come from the" in err
    statistics = reference_set.load(tmp_path / "aside").statistics
    assert statistics["n_defect"] < sum(1 for d in defects for _ in Path(d).glob("*.png"))
    assert main([*arguments, "--out", str(tmp_path / "tight"), "--min-good", "100"]) == 0
    assert "thresholds set on trained parts reject more good parts" in capsys.readouterr().err


def test_cli_input_size_reaches_the_checkpoint_and_is_refused_when_malformed(sim_dataset, tmp_path, capsys):
    assert (
        main(
            [
                "train",
                "--data",
                str(sim_dataset),
                "--out",
                str(tmp_path / "t.pt"),
                "--epochs",
                "1",
                "--input-size",
                "48x32",
            ]
        )
        == 0
    )
    _, info = load_checkpoint(tmp_path / "t.pt")
    assert (info["input_spec"]["width"], info["input_spec"]["height"]) == (48, 32)
    with pytest.raises(SystemExit):
        main(["train", "--data", str(sim_dataset), "--out", str(tmp_path / "u.pt"), "--input-size", "48by32"])
    assert "is not WxH" in capsys.readouterr().err


def test_the_export_report_names_lasting_paths_only(tmp_path):
    """station fit's linked sample folder (.fit-*/calibration-data) and temp folders are left out;
    a folder beside the model is named relative to it, any other lasting folder as it is."""
    bundle = Path("/srv/bundles/line1")
    assert onnx_export.lasting_path(bundle / ".fit-abc123" / "calibration-data", bundle) is None
    assert onnx_export.lasting_path(Path(tempfile.gettempdir()) / "tmp.zwop8LVyxW" / "train", bundle) is None
    assert onnx_export.lasting_path(tmp_path / "photos", bundle) is None
    assert onnx_export.lasting_path(None, bundle) is None
    assert onnx_export.lasting_path(bundle / "photos" / "train", bundle) == "photos/train"
    assert onnx_export.lasting_path("/data/tiles/train", bundle) == "/data/tiles/train"


def test_train_and_export_refuse_an_out_they_cannot_write_before_any_work(sim_dataset, tmp_path, capsys):
    """`station train --out` under a file trained for minutes, then ended in a FileExistsError traceback;
    export's failed at once, also as a traceback. Refused now, naming it, before anything is read."""
    (tmp_path / "afile").write_text("x")
    folder = tmp_path / "models"
    folder.mkdir()
    for argv, said in (
        (["train", "--data", str(sim_dataset), "--out", str(tmp_path / "afile" / "t.pt")], "cannot make that folder"),
        (["train", "--data", str(sim_dataset), "--out", str(folder)], "is a folder; give a file name"),
        (["export", str(tmp_path / "t.pt"), "--out", str(tmp_path / "afile" / "m.onnx")], "cannot make that folder"),
    ):
        assert main(argv) == 78
        err = capsys.readouterr().err
        assert err.startswith(f"station {argv[0]}: --out ") and said in err and "Traceback" not in err, err
    assert list(folder.iterdir()) == []


def test_the_gate_counts_no_flip_in_the_band_the_sample_cannot_resolve():
    """A part beside the threshold may flip under any retraining: the gate does not count it."""
    from export.gate import REFERENCE_P, gate_failures, int8_figures, quick_reference
    from station.core.metrics import minkowski

    rng = np.random.default_rng(0)
    goods = rng.normal(size=(120, 16))
    fp32 = np.concatenate([goods, goods[:10] + 3.0])
    is_good = np.arange(len(fp32)) < 120
    reference, threshold = quick_reference(fp32, is_good)
    order = np.argsort(minkowski(goods, reference, p=REFERENCE_P))
    # int8 swaps the two goods on either side of the threshold: same goods, same threshold, two flips.
    below, above = order[117], order[118]  # the 0.99 quantile of 120 lies between these
    int8 = fp32.copy()
    int8[[below, above]] = fp32[[above, below]]
    figures = int8_figures(fp32, int8, is_good)
    assert figures["verdict_agreement_all_parts"] < 0.995  # what the gate used to refuse
    assert figures["verdicts_changed"] == 0 and figures["verdicts_changed_in_band"] == 2
    failures = gate_failures({"torch_vs_fp32_max_abs_diff": 0.0, "int8": figures})
    assert failures == [next(f for f in failures if "cosine" in f)]  # two swapped rows; no verdict or rank failure
    # A model that scrambles the ranking is refused whatever the band says.
    scrambled = fp32[rng.permutation(len(fp32))]
    refused = gate_failures({"torch_vs_fp32_max_abs_diff": 0.0, "int8": int8_figures(fp32, scrambled, is_good)})
    assert any("rank" in failure for failure in refused) and any("AUROC" in failure for failure in refused)
    # A good far from the threshold that int8 turns into a reject is a flip the sample resolves.
    moved = fp32.copy()
    moved[order[0]] = fp32[120]
    figures = int8_figures(fp32, moved, is_good)
    assert figures["verdicts_changed"] >= 1
