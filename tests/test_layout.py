"""The house rules: folders import one way, the daemon loads only what judging needs."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

from tests.daemon_helpers import write_config

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("station", "calibration", "export", "fit")
# Which folders each folder may import (besides itself). A folder is a directory
# of modules; the files directly in it belong to it. Read top to bottom: nothing
# imports upward, so no two folders can import each other, directly or around a circle.
ALLOWED = {
    "station/core": set(),
    "station/runtime/sources": {"station/core"},
    "station/runtime/web": {"station/core"},  # the page: handed the daemon's figures, imports none of its modules
    "station/runtime/config": {
        "station/core",
        "station/runtime/sources",
    },  # station.yaml, parsed; reads no file it names
    "station/runtime/mqtt": {"station/core", "station/runtime/config"},  # the publisher reads mqtt: and its password
    "station/runtime/integrations": {
        "station/core",
        "station/runtime/sources",
        "station/runtime/web",
        "station/runtime/config",
        "station/runtime/mqtt",
    },  # fed by the daemon
    "station/runtime": {
        "station/core",
        "station/runtime/sources",
        "station/runtime/web",
        "station/runtime/config",
        "station/runtime/mqtt",
        "station/runtime/integrations",
    },
    "export": {"station/core"},
    "calibration": {"station/core", "station/runtime/sources"},
    "fit": {"station/core", "export", "calibration"},
    "station/tools": {
        "station/core",
        "station/runtime",
        "station/runtime/sources",
        "station/runtime/config",
        "station/runtime/mqtt",
        "station/runtime/integrations",
        "calibration",
    },
    "station/cli": {
        "station/core",
        "station/runtime",
        "station/runtime/config",
        "station/runtime/sources",
        "station/runtime/web",
        "station/tools",
        "calibration",
        "export",
        "fit",
    },
    "station": {"station/core", "station/cli"},  # __init__.py (the version), __main__.py
}
# Never in the `station run` process: the model side, the tools, and their heavy libraries.
# prometheus_client, asyncua and aiohttp only when station.yaml enables prometheus:, opcua: or web:.
NOT_IN_DAEMON = (
    "calibration",
    "export",
    "fit",
    "station.tools",
    "torch",
    "scipy",
    "matplotlib",
    "sklearn",
    "onnx",
    "prometheus_client",
    "asyncua",
    "aiohttp",
)


def folder_of_module(module: str) -> str | None:
    """station.runtime.sources.kinds -> station/runtime/sources; None for other libraries."""
    parts = module.split(".")
    if parts[0] not in PACKAGES:
        return None
    path = ROOT.joinpath(*parts)
    while parts and not (path.is_dir() and (path / "__init__.py").exists()):
        parts, path = parts[:-1], path.parent
    return "/".join(parts) if parts else None


def imported_modules(source: Path) -> set[str]:
    """Every module an import statement in the file names, at any depth (lazy imports too)."""
    package = ".".join(source.relative_to(ROOT).parent.parts)
    names = set()
    for node in ast.walk(ast.parse(source.read_text(), str(source))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def import_edges() -> set[tuple[str, str, str]]:
    edges = set()
    for package in PACKAGES:
        for source in (ROOT / package).rglob("*.py"):
            here = "/".join(source.relative_to(ROOT).parent.parts)
            for module in imported_modules(source):
                there = folder_of_module(module)
                if there is not None and there != here:
                    edges.add((here, there, f"{source.relative_to(ROOT)} imports {module}"))
    return edges


def test_every_folder_is_in_the_table():
    folders = {
        "/".join(p.parent.relative_to(ROOT).parts)
        for package in PACKAGES
        for p in (ROOT / package).rglob("__init__.py")
    }
    assert folders <= set(ALLOWED), f"new folder(s) {sorted(folders - set(ALLOWED))}: give them a place in ALLOWED"


def test_folders_import_one_way():
    backward = sorted(why for here, there, why in import_edges() if there not in ALLOWED[here])
    assert not backward, "imports against the folder graph (docs/architecture.md):\n" + "\n".join(backward)


def test_the_allowed_graph_has_no_circle():
    def reaches(start: str, goal: str, seen=()) -> bool:
        return any(
            step == goal or (step not in seen and reaches(step, goal, seen + (step,))) for step in ALLOWED[start]
        )

    assert not [folder for folder in ALLOWED if reaches(folder, folder)]


# A reader takes in a function whole or not at all; a module is a room one reads in a sitting. Lines as
# `ruff format` lays them out (scripts/test checks the layout), which spreads a call over a line an
# argument: formatting lengthened the tree by 12 %, so the caps of the hand-laid code (60 and 400) rose as much.
MAX_FUNCTION_LINES = 70
MAX_MODULE_LINES = 450
# Longer on purpose, each with its reason; an entry is a path and the function's name.
LONG_FUNCTIONS = {
    ("station/cli/__init__.py", "build_parser"): "the command line's table: one add_argument a line, read as a list",
    ("export/per_row.py", "per_row_dynamic"): "one rewrite of the ONNX graph, node by node, in graph order",
    ("export/train.py", "train_split"): "the training run in the order it happens (load, train, choose the epoch)",
    ("fit/pipeline.py", "_fit_in"): "the fit's steps in the order they run (search, audit model, bundle model, "
    "report); the search and the final models are the two halves to split it into",
    ("calibration/live.py", "_grab_and_save"): "one camera-mode calibration's grab loop with its progress and "
    "its refusals, in the order an operator sees them",
}
LONG_MODULES: dict[str, str] = {  # path -> why it stays one room, for now
    "station/runtime/daemon.py": "the Daemon split of issue 28 is still to come (a station built whole, commands apart)",
    "station/runtime/mqtt/publisher.py": "one paho client's life: connect, callbacks, drain; the inbound command "
    "channel (subscription, messages, replies) is the part to move out next",
    "export/train.py": "one training run and the helpers only it uses (batches, schedule, early stop, members)",
    "fit/pipeline.py": "the fit's one path from checked data to bundle; the final models' build is the part to "
    "move out next",
}


def _sources():
    return [p for package in PACKAGES for p in (ROOT / package).rglob("*.py")]


def test_functions_and_modules_are_short_enough_to_read():
    """What a line cap is for: code a reader can hold. A function over MAX_FUNCTION_LINES (its def to its last
    line) does several things; split it, or name it in LONG_FUNCTIONS with the reason it reads better whole. A
    module over MAX_MODULE_LINES holds more than one room's worth; split it, or name it in LONG_MODULES. An
    entry whose function or module got short again is stale and fails too, so the lists stay true."""
    long_functions, long_modules = {}, {}
    for source in _sources():
        where = str(source.relative_to(ROOT))
        text = source.read_text()
        if (lines := len(text.splitlines())) > MAX_MODULE_LINES:
            long_modules[where] = lines
        for node in ast.walk(ast.parse(text, where)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                if (lines := node.end_lineno - node.lineno + 1) > MAX_FUNCTION_LINES:
                    long_functions[(where, node.name)] = lines
    too_long = [
        f"{where}: {name}: {lines} lines"
        for (where, name), lines in sorted(long_functions.items())
        if (where, name) not in LONG_FUNCTIONS
    ]
    too_long += [
        f"{where}: {lines} lines" for where, lines in sorted(long_modules.items()) if where not in LONG_MODULES
    ]
    assert not too_long, f"over {MAX_FUNCTION_LINES} lines a function, {MAX_MODULE_LINES} a module:\n" + "\n".join(
        too_long
    )
    stale = sorted(set(LONG_FUNCTIONS) - set(long_functions)) + sorted(set(LONG_MODULES) - set(long_modules))
    assert not stale, f"short again, take them off the list: {stale}"


RUNNER = """
import json, sys
from station.cli import main
code = main(["run", "-c", sys.argv[1]])
with open(sys.argv[2], "w") as out:
    json.dump(sorted(sys.modules), out)
sys.exit(code)
"""


def test_the_daemon_loads_only_what_judging_needs(tmp_path, station_files, broker, sim_dataset):
    config = write_config(tmp_path, station_files, broker, f"{{source: {sim_dataset / 'good'}}}")
    listing = tmp_path / "modules.json"
    done = subprocess.run(
        [sys.executable, "-c", RUNNER, str(config), str(listing)], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr

    loaded = json.loads(listing.read_text())
    assert "station.runtime.daemon" in loaded and "onnxruntime" in loaded  # it did judge
    unwanted = sorted(
        name for name in loaded if name.split(".")[0] in NOT_IN_DAEMON or name.startswith("station.tools")
    )
    assert not unwanted, f"`station run` loaded {unwanted}"
