"""The one place that says what kind of camera a `camera.source` value is.

Config validation, open_source, `station check` and the finite/lossless
rules all ask `source_kind` instead of looking at prefixes themselves.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import parse_qs, quote, urlsplit, urlunsplit

DEVICE, URL, SIM, FOLDER, FILE = "device", "url", "sim", "folder", "file"
GENICAM = "genicam"  # GigE Vision / USB3 Vision through Aravis: genicam://DEVICE
URL_SCHEMES = ("rtsp://", "rtsps://", "http://", "https://")
SIM_SCHEME = "sim://"
GENICAM_SCHEME = "genicam://"
DEVICE_PREFIX = "/dev/video"


def source_kind(source: int | str | Path) -> str:
    """device (index or /dev/videoN), url, sim, genicam, folder (an existing directory) or file.

    Raises ValueError for what no source kind accepts (booleans, unknown URL schemes).
    """
    if isinstance(source, bool) or not isinstance(source, (int, str, Path)):
        raise ValueError(f"camera source {source!r} is not a device, URL, file or folder")
    if isinstance(source, int) or (isinstance(source, str) and source.isdigit()):
        return DEVICE
    text = str(source)
    if text.startswith(SIM_SCHEME):
        return SIM
    if text.startswith(GENICAM_SCHEME):
        parse_genicam_source(text)
        return GENICAM
    if text.startswith(DEVICE_PREFIX):
        return DEVICE
    if text.startswith(URL_SCHEMES):
        return URL
    if "://" in text:
        raise ValueError(f"{text!r}: unsupported URL scheme (rtsp, http, https, sim or genicam)")
    return FOLDER if Path(text).is_dir() else FILE


def is_stored_media(kind: str) -> bool:
    """Files, folders and sim:// come from storage: every frame matters and
    they can be read without disturbing anyone; devices and streams are live."""
    return kind not in (DEVICE, URL, GENICAM)


def parse_genicam_source(source: str) -> str:
    """The Aravis device of genicam://DEVICE: a device id (Vendor-Model-Serial as arv-tool lists it) or an IP address."""
    device = source[len(GENICAM_SCHEME) :] if source.startswith(GENICAM_SCHEME) else ""
    if not device.strip() or device != device.strip() or "/" in device:
        raise ValueError(
            f"{source!r}: a GenICam camera looks like genicam://DEVICE (an Aravis device id as "
            "arv-tool-0.8 lists it, e.g. genicam://Basler-210ab4, or an IP address)"
        )
    return device


def parse_sim_source(source: str) -> tuple[int, int | None]:
    """(seed, count) of a sim://[?seed=N&count=N] source; count None = endless."""
    parts = urlsplit(source)
    if parts.scheme != "sim" or parts.netloc or parts.path not in ("", "/"):
        raise ValueError(f"{source!r}: a simulated source looks like sim://?seed=N&count=N")
    params = parse_qs(parts.query, keep_blank_values=True)
    unknown = set(params) - {"seed", "count"}
    if unknown:
        raise ValueError(f"{source!r}: unknown parameter(s) {', '.join(sorted(unknown))} (seed, count)")
    try:
        seed = int(params.get("seed", ["0"])[-1])
        count = int(params["count"][-1]) if "count" in params else None
    except ValueError:
        raise ValueError(f"{source!r}: seed and count must be integers") from None
    if seed < 0 or (count is not None and count < 1):
        raise ValueError(f"{source!r}: seed must be >= 0 and count >= 1")
    return seed, count


def with_credentials(url: str, credentials: tuple[str, str] | None) -> str:
    """rtsp://host/x + (user, password) -> rtsp://user:password@host/x (percent-encoded)."""
    if credentials is None:
        return url
    user, password = (quote(part, safe="") for part in credentials)
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=f"{user}:{password}@{parts.netloc}"))


def without_credentials(url: str) -> str:
    """rtsp://user:pass@host/x -> rtsp://host/x: never log a camera password."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))
