"""Shared fixtures: a real mosquitto broker on a free loopback port, simulated data, a station's model and
reference sets. Helpers that start the daemon are in tests/daemon_helpers.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from station.tools.loopback import Mosquitto


# The tests' broker is the station's own loopback mosquitto (stop/start, extra config).
Broker = Mosquitto


@pytest.fixture(scope="session")
def mosquitto(tmp_path_factory):
    """A running mosquitto broker for the whole session (host, port on loopback)."""
    broker = Broker(tmp_path_factory.mktemp("mosquitto"))
    broker.start()
    yield broker
    broker.stop()


@pytest.fixture(scope="session")
def sim_dataset(tmp_path_factory) -> Path:
    """A small simulated image-folder dataset shared by the session (read only)."""
    from station.tools.simulate import write_dataset

    root = tmp_path_factory.mktemp("sim") / "parts"
    write_dataset(root, count=240, seed=11)
    return root


@pytest.fixture
def broker(tmp_path):
    """A broker of the test's own (stopped, restarted or reconfigured by it)."""
    folder = tmp_path / "broker"
    folder.mkdir()
    broker = Broker(folder)
    broker.start()
    yield broker
    broker.stop()


@pytest.fixture(scope="module")
def station_files(tmp_path_factory, sim_dataset):
    """A model and two products' reference sets (A and B) for it."""
    from calibration import workflow
    from station.core.embedder import Embedder
    from tests.onnx_models import projection_model

    root = tmp_path_factory.mktemp("files")
    model = projection_model(root / "model.onnx", embedding_dim=32)
    embedder = Embedder(model)
    for product, metric in (("A", "mahalanobis"), ("B", "minkowski")):
        workflow.calibrate_folders(embedder, sim_dataset / "good", [], root / "refs" / product, product, metric=metric)
    return root


@pytest.fixture
def fake_camera_factory():
    """Start fake GigE Vision cameras (tests/genicam_helpers.py), one test at a time on this machine."""
    import fcntl

    from tests.genicam_helpers import LOCK, FakeCamera

    LOCK.touch(exist_ok=True)
    with LOCK.open() as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one fake camera on 127.0.0.1 at a time, across test runs
        cameras = []

        def make(*args: str):
            camera = FakeCamera(*args)
            cameras.append(camera)
            camera.start()
            return camera

        try:
            yield make
        finally:
            for camera in cameras:
                camera.kill()


@pytest.fixture
def fake_camera(fake_camera_factory):
    return fake_camera_factory()
