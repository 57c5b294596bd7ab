"""The click group every ``caffeport`` subcommand hangs from.

Command modules (``caffeport/cli/<family>_cmds.py``) import :data:`main` and decorate their
commands with ``@main.command(...)``. Library errors (:class:`CaffeportError`) become one readable
line on stderr and exit status 1; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import sys

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
