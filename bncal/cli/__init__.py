"""The ``bncal`` command line: a thin layer over the library.

One module per command (``recalibrate``, ``check``, ``fold_export``, ``inspect``, ``demo``), each
a body over option groups (:mod:`bncal.cli.options`). This module holds the main group; :mod:`bncal.cli.runner`
holds the error handling every command shares (:func:`~bncal.cli.runner.run_command`):

* exit 0 success; 1 a user-facing error (one line, ``error: ...``, the traceback with ``-v``) or
  a failed verification or check; 2 a usage error (click's convention, also for values that are
  themselves wrong); 143 SIGTERM, 129 SIGHUP;
* the run's outputs are planned and checked before any work and written only when it succeeds
  (:class:`bncal.outputs.OutputPlan`); under torchrun every message names its rank.

Heavy modules (torch, onnx, onnxruntime) are imported inside the commands, so ``--help`` stays fast.
"""

from __future__ import annotations

import contextlib
import sys
import time

import click

from .options import VerbosityArgs

__all__ = ["main"]


class _Main(click.Group):
    """The ``bncal`` group; it keeps the command line as given, for the JSON reports (``ctx.meta["bncal.argv"]``),
    and when it was parsed, for the run's elapsed time (``ctx.meta["bncal.started"]``)."""

    def make_context(self, info_name, args, parent=None, **extra):
        argv, started = ["bncal", *args], time.perf_counter()
        with _interrupt_is_an_error():
            ctx = super().make_context(info_name, args, parent=parent, **extra)
        ctx.meta["bncal.argv"], ctx.meta["bncal.started"] = argv, started
        return ctx

    def invoke(self, ctx):
        with _interrupt_is_an_error():
            return super().invoke(ctx)


@contextlib.contextmanager
def _interrupt_is_an_error():
    """Ctrl-C while the command starts (parsing, imports): bncal's own line, not click's "Aborted!"
    (:func:`run_command` words one that comes later)."""
    try:
        yield
    except KeyboardInterrupt:
        click.echo("error: interrupted while starting; nothing was written", err=True)
        sys.exit(1)


@click.group(cls=_Main, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
             params=VerbosityArgs.options())
@click.version_option(package_name="bncal")
@click.pass_context
def main(ctx: click.Context, verbose: bool, quiet: bool) -> None:
    """bncal: make BatchNorm networks safe to deploy.

    Recalibrate moving statistics exactly, fold BN and export to ONNX with proof of parity
    in onnxruntime, check train-mode vs inference-mode agreement, and diagnose BN setups.
    """
    ctx.meta["bncal.verbose"], ctx.meta["bncal.quiet"] = verbose, quiet


from . import check, demo, fold_export, inspect, recalibrate  # noqa: E402  (the commands register below)

for _module in (inspect, check, recalibrate, fold_export, demo):
    main.add_command(_module.command)


if __name__ == "__main__":  # pragma: no cover
    main()
