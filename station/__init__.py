"""Inspection station runtime: camera -> roi -> embed -> score -> verdict -> publish.

Importing this package must stay cheap and must never load torch: line PCs
install only the runtime dependencies.
"""
from importlib import metadata as _metadata

try:
    __version__ = _metadata.version("inspection-station")
except _metadata.PackageNotFoundError:  # running from a source tree without install
    __version__ = "0.0.0+source"
