"""Issue 15: train_split, augmentation, synthetic anomalies, early stopping, input size.

Real torch and real onnxruntime on a small simulated folder, a few epochs each.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the train extra is not installed")

from export import train as train_module  # noqa: E402
from export.augment import NO_AUGMENTATION, STRONG_AUGMENTATION, augment  # noqa: E402
from export.dataset import auroc  # noqa: E402
from export.onnx_export import ExportOptions, export_model  # noqa: E402
from export.synthetic import KINDS, Negatives, synthesize  # noqa: E402
from export.train import TrainConfig, train_split  # noqa: E402
from export.trunk import load_checkpoint  # noqa: E402
from station.core.embedder import Embedder  # noqa: E402
from station.core.errors import ConfigError, DataError  # noqa: E402
from tests.onnx_models import embed_frames  # noqa: E402
from station.core.imagefolder import read_image, scan_dataset  # noqa: E402


def split(dataset, goods_only=False):
    items = scan_dataset(dataset)
    if goods_only:
        items = [item for item in items if not item.is_defect]
    return items[::4] + items[1::4] + items[2::4], items[3::4]  # train 3/4, val 1/4


def test_goods_only_trains_on_synthetic_anomalies_and_exports_int8(sim_dataset, tmp_path):
    train, val = split(sim_dataset, goods_only=True)
    result = train_split(train, val, tmp_path / "goods.pt", TrainConfig(epochs=6), data_root=sim_dataset)
    assert result.val_negatives == "synthetic"
    assert 0.0 <= result.val_auroc <= 1.0 and 0.0 <= result.val_escape_rate <= 1.0
    assert 1 <= result.best_epoch <= result.epochs_run <= 6
    _, info = load_checkpoint(result.checkpoint)
    assert info["n_train_defects"] == 0 and info["synthetic_share"] == 1.0
    assert info["best_epoch"] == result.best_epoch and info["val_auroc"] == result.val_auroc
    out = tmp_path / "goods.onnx"
    report = export_model(result.checkpoint, out)
    assert report["passed"], report["failures"]
    images = [read_image(item.path) for item in val[:5]]
    assert embed_frames(Embedder(out), images).shape == (5, 3 * 128)  # the default ensemble: three trunks


def test_never_synthetic_without_defects_is_refused(sim_dataset, tmp_path):
    train, val = split(sim_dataset, goods_only=True)
    with pytest.raises(DataError, match="synthetic"):
        train_split(train, val, tmp_path / "x.pt", TrainConfig(epochs=1, synthetic_anomalies="never"))


def test_an_empty_val_is_carved_from_train(sim_dataset, tmp_path):
    train, _ = split(sim_dataset)
    result = train_split(train, [], tmp_path / "v.pt", TrainConfig(epochs=1))
    assert result.n_train + result.n_val == len(train) and result.n_val > 0
    assert result.val_negatives == "defects"


def test_early_stopping_keeps_the_best_epochs_weights(sim_dataset, tmp_path, monkeypatch):
    """The held-out criterion peaks at epoch 10; patience 10 stops at 20 and keeps epoch 10's weights."""
    scripted = iter([0.70, 0.90, 0.80, 0.85, 0.60, 0.50])
    seen = []

    def fake_figures(model, *args):
        seen.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return next(scripted), 0.0

    monkeypatch.setattr(train_module, "held_out_figures", fake_figures)
    monkeypatch.setattr(train_module, "EVAL_EVERY", 5)
    train, val = split(sim_dataset)
    result = train_split(train, val, tmp_path / "es.pt", TrainConfig(epochs=40, patience=10, members=1))
    assert (result.best_epoch, result.epochs_run, result.val_auroc) == (10, 20, 0.90)
    assert len(seen) == 4
    kept = torch.load(tmp_path / "es.pt", weights_only=True)
    assert kept["val_history"] == [[5, 0.7, 0.0], [10, 0.9, 0.0], [15, 0.8, 0.0], [20, 0.85, 0.0]]
    assert all(torch.equal(kept["state_dict"][k], seen[1][k]) for k in seen[1])
    assert not all(torch.equal(kept["state_dict"][k], seen[3][k]) for k in seen[3])


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_input_size_reaches_the_exported_metadata_and_the_embedder(sim_dataset, tmp_path, arch):
    train, val = split(sim_dataset)
    config = TrainConfig(arch=arch, epochs=1, input_size=(48, 32), members=1)
    result = train_split(train, val, tmp_path / "big.pt", config, data_root=sim_dataset)
    assert torch.load(result.checkpoint, weights_only=True)["input_spec"]["width"] == 48
    out = tmp_path / "big.onnx"
    export_model(result.checkpoint, out, ExportOptions(fp32=arch == "cnn"))
    embedder = Embedder(out)
    metadata = embedder.session.get_modelmeta().custom_metadata_map
    assert (metadata["input_width"], metadata["input_height"]) == ("48", "32")
    assert (embedder.input_spec.width, embedder.input_spec.height) == (48, 32)
    images = [read_image(item.path) for item in val[:4]]  # any size: the station resizes to the model input
    assert images[0].shape[:2] != (32, 48)
    assert embed_frames(embedder, images).shape == (4, 128)


def test_a_bad_input_size_or_mode_is_a_config_error():
    for config in (
        TrainConfig(input_size=(2, 30)),
        TrainConfig(synthetic_anomalies="maybe"),
        TrainConfig(augmentation="heavy"),
        TrainConfig(weight_decay=-1.0),
        TrainConfig(patience=0),
    ):
        with pytest.raises(ConfigError):
            config.check()


def asymmetric_crops(n=32):
    crops = np.full((n, 26, 36), 60, np.uint8)
    crops[:, :, 18:] = 200  # right half bright
    return crops


def test_augmentation_keeps_shape_and_dtype_and_is_repeatable():
    crops = np.random.default_rng(0).integers(0, 256, (16, 26, 36), dtype=np.uint8)
    first = augment(crops, np.random.default_rng(1))
    assert first.shape == crops.shape and first.dtype == np.uint8
    np.testing.assert_array_equal(first, augment(crops, np.random.default_rng(1)))
    assert not np.array_equal(first, crops)
    np.testing.assert_array_equal(augment(crops, np.random.default_rng(1), recipe=NO_AUGMENTATION), crops)
    with pytest.raises(ValueError):
        augment(crops.astype(np.float32), np.random.default_rng(1))


def test_augmentation_flips_only_when_allowed():
    crops = asymmetric_crops()
    kept = augment(crops, np.random.default_rng(2), allow_flips=False, recipe=STRONG_AUGMENTATION)
    assert np.all(kept[:, :, :12].mean(axis=(1, 2)) < kept[:, :, -12:].mean(axis=(1, 2)))
    unflipped = augment(crops, np.random.default_rng(2), allow_flips=False, recipe=NO_AUGMENTATION)
    np.testing.assert_array_equal(unflipped, crops)
    flipped = augment(crops, np.random.default_rng(2), allow_flips=True, recipe=NO_AUGMENTATION)
    mirrored = np.array([np.array_equal(f, c[:, ::-1]) for f, c in zip(flipped, crops)])
    assert 0 < mirrored.sum() < len(crops)


@pytest.mark.parametrize("kind", KINDS)
def test_each_synthetic_anomaly_changes_a_good_crop_locally(kind):
    goods = np.full((4, 26, 36), 60, np.uint8)
    goods[:, 4:18, 8:28] = 190  # a bright part on a dark background
    goods += np.random.default_rng(0).integers(0, 6, goods.shape, dtype=np.uint8)
    drawn = synthesize(goods, 20, np.random.default_rng(3), kinds=(kind,))
    assert drawn.shape == (20, 26, 36) and drawn.dtype == np.uint8
    base = goods[0].astype(int)  # the four goods are alike to within the noise
    changed = np.abs(drawn.astype(int) - base) > 20
    assert np.all(changed.any(axis=(1, 2)))  # every one is visible
    assert changed.mean() < 0.3  # and local


def test_negatives_mix_synthetic_anomalies_in_only_when_real_defects_are_few():
    crops = np.random.default_rng(0).integers(0, 256, (100, 26, 36), dtype=np.uint8)

    def share(n_defects, mode="auto"):
        is_defect = np.arange(100) < n_defects
        return Negatives(crops, is_defect, mode).share

    assert (share(0), share(5), share(40)) == (1.0, 0.5, 0.0)
    assert share(40, "always") == 0.5 and share(5, "never") == 0.0
    with pytest.raises(DataError):
        share(0, "never")
    drawn = Negatives(crops, np.arange(100) < 5, "auto").draw(16, np.random.default_rng(0))
    assert drawn.shape == (16, 26, 36) and drawn.dtype == np.uint8


def test_auroc_counts_ties_half():
    assert auroc(np.array([0.1, 0.2]), np.array([0.3, 0.4])) == 1.0
    assert auroc(np.array([0.3, 0.4]), np.array([0.1, 0.2])) == 0.0
    assert auroc(np.array([0.5, 0.5]), np.array([0.5])) == 0.5


def test_an_ensemble_is_its_members_side_by_side_each_from_its_own_seed(sim_dataset, tmp_path):
    """Member k trains from seed + k on the same parts and val slice; the model concatenates their
    unit embeddings scaled back to unit length, and a one-member model is the plain trunk."""
    train, val = split(sim_dataset)
    single = train_split(train, val, tmp_path / "one.pt", TrainConfig(epochs=2, members=1, seed=4))
    pair = train_split(train, val, tmp_path / "two.pt", TrainConfig(epochs=2, members=2, seed=4))
    one, _ = load_checkpoint(single.checkpoint)
    two, info = load_checkpoint(pair.checkpoint)
    assert info["members"] == 2 and info["embedding_dim"] == 256 and len(info["member_best_epochs"]) == 2
    assert info["trained_on"] == load_checkpoint(single.checkpoint)[1]["trained_on"]  # one split for all
    crops = torch.from_numpy(np.random.default_rng(0).random((6, 1, 26, 36), dtype=np.float32))
    with torch.no_grad():
        joined, alone = two(crops).numpy(), one(crops).numpy()
    np.testing.assert_allclose(np.linalg.norm(joined, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(joined[:, :128] * np.sqrt(2), alone, atol=1e-5)  # member 0 is the seed-4 trunk
    assert not np.allclose(joined[:, :128], joined[:, 128:], atol=1e-3)  # member 1 is another trunk
    with pytest.raises(ConfigError, match="--members"):
        TrainConfig(members=0).check()
