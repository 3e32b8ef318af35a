"""`station export model.keras`: the source study's Keras 3 Siamese model, imported and exported."""

import os

import numpy as np
import pytest

os.environ.setdefault("KERAS_BACKEND", "torch")
keras = pytest.importorskip("keras")

from station.cli import main  # noqa: E402
from station.core.embedder import Embedder  # noqa: E402
from station.core.errors import ModelError  # noqa: E402
from station.core.imagefolder import list_images, read_image  # noqa: E402
from tests.onnx_models import model_input  # noqa: E402


def siamese(path, units=(512, 256, 128), activations=("relu", "relu", None)):
    """The source study's shape: a Dense base network twice, a Lambda distance on top."""
    keras.utils.set_random_seed(3)
    base_input = keras.Input((936,))
    x = base_input
    for width, activation in zip(units, activations):
        x = keras.layers.Dense(width, activation=activation)(x)
    base = keras.Model(base_input, x, name="base_network")
    left, right = keras.Input((936,)), keras.Input((936,))
    distance = keras.layers.Lambda(
        lambda pair: keras.ops.sqrt(keras.ops.sum(keras.ops.square(pair[0] - pair[1]), axis=1, keepdims=True))
    )([base(left), base(right)])
    keras.Model([left, right], distance).save(path)
    return base


def test_a_keras_siamese_model_exports_to_the_same_embeddings(tmp_path, sim_dataset, capsys):
    base = siamese(tmp_path / "siamese.keras")
    out = tmp_path / "model.onnx"
    assert (
        main(["export", str(tmp_path / "siamese.keras"), "--out", str(out), "--fp32", "--calib-data", str(sim_dataset)])
        == 0
    )
    assert "imported" in capsys.readouterr().out
    embedder = Embedder(out)
    assert embedder.info.arch == "mlp" and embedder.input_spec.layout == "flat"
    images = [read_image(p) for p in list_images(sim_dataset / "good")[:32]]
    batch = model_input(images, embedder.input_spec)
    expected = np.asarray(base.predict(batch, verbose=0))
    np.testing.assert_allclose(embedder.embed(batch), expected, atol=1e-4)
    # int8 goes through the same gate as a trained trunk, and passes it
    assert (
        main(
            [
                "export",
                str(tmp_path / "siamese.keras"),
                "--out",
                str(tmp_path / "int8.onnx"),
                "--calib-data",
                str(sim_dataset),
            ]
        )
        == 0
    )
    assert Embedder(tmp_path / "int8.onnx").info.quantization == "int8-dynamic"


def test_a_keras_model_of_another_shape_is_refused(tmp_path, capsys):
    siamese(tmp_path / "other.keras", units=(256, 128, 64))
    assert main(["export", str(tmp_path / "other.keras"), "--out", str(tmp_path / "m.onnx"), "--fp32"]) == 66
    assert "expected the source study's Dense 936-512-256-128" in capsys.readouterr().err
    (tmp_path / "junk.keras").write_bytes(b"not a zip")
    from export.keras_import import read_keras_mlp

    with pytest.raises(ModelError, match="not a Keras 3 .keras archive"):
        read_keras_mlp(tmp_path / "junk.keras")
