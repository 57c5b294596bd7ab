"""The click group every ``caffeport`` subcommand hangs from.

Command modules (``caffeport/cli/<family>_cmds.py``) import :data:`main` and decorate their
commands with ``@main.command(...)``. Library errors (:class:`CaffeportError`) become one readable
line on stderr and exit status 1; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import sys
from typing import Any

import click

from caffeport.errors import CaffeportError


class _Group(click.Group):
    def invoke(self, ctx: click.Context):  # type: ignore[override]
        try:
            return super().invoke(ctx)
        except CaffeportError as e:
            if ctx.params.get("debug"):
                raise
            click.echo(f"caffeport: error: {e}", err=True)
            sys.exit(1)
        except OSError as e:  # disk full, permissions, missing files that no library check caught
            if ctx.params.get("debug"):
                raise
            where = f": {e.filename}" if e.filename else ""
            click.echo(f"caffeport: error: {e.strerror or e}{where}", err=True)
            sys.exit(1)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show the full traceback on errors.")
@click.version_option(package_name="caffeport")
def main(debug: bool) -> None:
    """caffeport: Caffe nets, weights, solvers and LMDBs on PyTorch, exactly as Caffe runs them."""


def allow_python_layers_option(fn: Any) -> Any:
    """Add ``--allow-python-layers`` to a command that builds nets: without it, ``type: "Python"``
    layers do not import the module their prototxt names (pycaffe would, unasked). The flag also sets
    CAFFEPORT_ALLOW_PYTHON_LAYERS=1 for the command's duration so spawned training workers inherit it."""
    import functools

    @functools.wraps(fn)
    def run(*args: Any, allow_python_layers_flag: bool = False, **kwargs: Any) -> Any:
        import os

        from caffeport.layers.base import ALLOW_PYTHON_ENV, allow_python_layers

        if not allow_python_layers_flag:
            return fn(*args, **kwargs)
        old = os.environ.get(ALLOW_PYTHON_ENV)
        os.environ[ALLOW_PYTHON_ENV] = "1"
        try:
            with allow_python_layers(True):
                return fn(*args, **kwargs)
        finally:
            if old is None:
                os.environ.pop(ALLOW_PYTHON_ENV, None)
            else:
                os.environ[ALLOW_PYTHON_ENV] = old

    return click.option("--allow-python-layers", "allow_python_layers_flag", is_flag=True,
                        help="Trust the net's Python layers: import and run the modules their python_param "
                             "names (off by default).")(run)
