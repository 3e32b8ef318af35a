"""`station check`: is this configuration ready to run? Config, model, reference sets, files.

Returns every problem at once, each naming the file or key it concerns, so
plant IT can fix a station in one round instead of one error per restart.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from station.runtime.config import StationConfig
from station.core.errors import StationError
from station.runtime.sources.kinds import FILE, source_kind


@dataclass(frozen=True)
class CheckResult:
    problems: list[str]
    summary: list[str]  # what was found good, one line each

    @property
    def ok(self) -> bool:
        return not self.problems


def check_station(config: StationConfig, env: dict[str, str] | None = None) -> CheckResult:
    from station.core import reference_set
    from station.core.embedder import Embedder

    env = os.environ if env is None else env
    problems, summary = [], []
    embedder = None
    try:
        embedder = Embedder(config.model)
        info = embedder.info
        summary.append(f"model {config.model}: {info.arch}, {info.quantization}, {info.embedding_dim}-d, sha256 {info.short_id}")
    except StationError as exc:
        problems.append(f"model: {exc}")
    for product, path in config.product_references.items():
        try:
            loaded = reference_set.load(path)
            if embedder is not None:
                reference_set.verify_for_model(loaded, embedder.info.sha256, embedder.info.embedding_dim)
            summary.append(f"product {product}: {path} v{loaded.version:04d}, {loaded.metric} threshold {loaded.threshold:.6g}")
        except StationError as exc:
            problems.append(f"product {product}: {exc}")
    problems += _file_problems(config, env)
    return CheckResult(problems, summary)


def _file_problems(config: StationConfig, env) -> list[str]:
    problems = []
    source = config.camera.source
    # Devices, URLs and sim:// are checked by the daemon (they come and go); a file or folder must exist.
    if source_kind(source) == FILE and not Path(source).exists():
        problems.append(f"camera.source: {source} does not exist (a video file or an image folder)")
    mqtt = config.mqtt
    if mqtt.password_file is not None and not os.access(mqtt.password_file, os.R_OK):
        problems.append(f"mqtt.password_file: {mqtt.password_file} cannot be read")
    if mqtt.password_credential is not None:
        folder = env.get("CREDENTIALS_DIRECTORY")
        if not folder:
            problems.append("mqtt.password_credential: $CREDENTIALS_DIRECTORY is not set (run under systemd with LoadCredential=)")
        elif not os.access(Path(folder) / mqtt.password_credential, os.R_OK):
            problems.append(f"mqtt.password_credential: {Path(folder) / mqtt.password_credential} cannot be read")
    if mqtt.tls is not None:
        for key in ("ca", "cert", "key"):
            path = getattr(mqtt.tls, key)
            if path is not None and not os.access(path, os.R_OK):
                problems.append(f"mqtt.tls.{key}: {path} cannot be read")
    state = Path(config.state_dir)
    existing = next((p for p in (state, *state.parents) if p.exists()), None)
    if existing is None or not os.access(existing, os.W_OK):
        problems.append(f"state_dir: {state} is not writable")
    return problems
