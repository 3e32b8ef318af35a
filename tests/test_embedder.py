"""The embedder: real onnxruntime sessions on small real ONNX models."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from station.core.embedder import Embedder
from station.core.errors import ModelError
from tests.onnx_models import projection_model


def test_a_model_that_does_not_describe_itself_is_refused(tmp_path):
    path = projection_model(tmp_path / "m.onnx")
    model = onnx.load(str(path))
    del model.metadata_props[:]
    onnx.save(model, str(path))
    with pytest.raises(ModelError, match="does not describe itself.*input_width"):
        Embedder(path)


def test_metadata_that_contradicts_the_graph_is_refused(tmp_path):
    wrong_size = projection_model(tmp_path / "size.onnx", metadata={"input_width": "40"})
    with pytest.raises(ModelError, match="input shape .* does not match its metadata"):
        Embedder(wrong_size)
    wrong_dim = projection_model(tmp_path / "dim.onnx", embedding_dim=32, metadata={"embedding_dim": "64"})
    with pytest.raises(ModelError, match="output shape .* does not match its metadata embedding_dim 64"):
        Embedder(wrong_dim)


@pytest.mark.parametrize("layout", ["flat", "nchw"])
def test_a_batch_and_its_parts_one_by_one_give_the_same_embeddings(tmp_path, layout):
    embedder = Embedder(projection_model(tmp_path / "m.onnx", layout=layout))
    rng = np.random.default_rng(0)
    batch = rng.random((20,) + embedder.input_spec.sample_shape, dtype=np.float32)
    whole = embedder.embed(batch)
    alone = np.concatenate([embedder.embed(batch[i : i + 1]) for i in range(len(batch))])
    assert whole.shape == alone.shape == (20, 32)
    np.testing.assert_allclose(alone, whole, rtol=0, atol=1e-6)
