"""What every station.yaml section is built on: one pydantic base model, paths relative to the file, and the
names that reach MQTT topics.

In core because sections live on both sides of the folder graph: station/runtime's config modules, and
station/runtime/sources/genicam_config.py, which may import only station/core (so may fit/, which writes
station.yaml files).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationInfo

# A station's name is a level of every topic, the MQTT client id and its state folder's name.
STATION_ID_CHARACTERS = "A-Za-z0-9_-"
MAX_STATION_ID = 64


class ConfigModel(BaseModel):
    # Frozen: a parsed configuration is shared by threads and compared whole on reload. A misspelt key is an
    # error, not a default silently kept. No inf or NaN in any number: `max_mb: .inf` would pass `ge=0` and break
    # the size bound.
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


def resolve_path(value: Path, info: ValidationInfo) -> Path:
    """A relative path, against the folder of the file it was written in (the validation context's `base`)."""
    base = (info.context or {}).get("base")
    return value if value.is_absolute() or base is None else base / value


ConfigPath = Annotated[Path, AfterValidator(resolve_path)]
StationId = Annotated[str, Field(pattern=rf"^[{STATION_ID_CHARACTERS}]+$", max_length=MAX_STATION_ID)]
# The name of a systemd credential (LoadCredential=NAME:...), looked up in $CREDENTIALS_DIRECTORY.
CredentialName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]+$")]
