"""Inspection station: camera -> roi -> embed -> score -> verdict -> publish.

station/core     pure pieces every other folder may import
station/runtime  the daemon (`station run`) and what it needs: config/, mqtt/, integrations/, sources/, web/
station/tools    check, bench, demo, simulate, loopback
calibration/ and export/ sit beside the runtime and use station.core;
station/cli/ (the `station` command) is the top and is imported by nothing.

Importing this package must stay cheap and must never load torch: line PCs
install only the runtime dependencies.
"""

from station.core.version import __version__

__all__ = ["__version__"]
