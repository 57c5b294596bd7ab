"""``caffeport`` command line: thin click commands over the library."""

from __future__ import annotations

import importlib

from caffeport.cli._group import main

# Each family module adds its commands to `main` when imported.
for _mod in ("io_cmds", "net_cmds", "train_cmds", "tool_cmds", "recipe_cmds", "export_cmds"):
    try:
        importlib.import_module(f"caffeport.cli.{_mod}")
    except ModuleNotFoundError as _e:  # a family not written yet
        if _e.name != f"caffeport.cli.{_mod}":
            raise

__all__ = ["main"]
