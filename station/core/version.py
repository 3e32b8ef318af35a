"""The installed package's version, written into models and reference sets."""

from importlib import metadata as _metadata

try:
    __version__ = _metadata.version("inspection-station")
except _metadata.PackageNotFoundError:  # running from a source tree without install
    __version__ = "0.0.0+source"
