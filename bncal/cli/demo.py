"""``bncal demo``: the whole story on the shipped model and real data."""

from __future__ import annotations

import types

import click

from ..errors import BncalError
from .options import OptionGroup, OutputArgs, ReportArgs, VerbosityArgs, command


class DemoArgs(OptionGroup):
    """Where the demo reads its model from and writes its files to."""

    name = "demo"

    def params(self):
        return [
            click.Option(["--out", "out_dir"], type=click.Path(file_okay=False), default="bncal-demo", show_default=True,
                         help="Folder for the demo's files (recalibrated weights, folded ONNX model); created if missing."),
            click.Option(["--models-dir"], type=click.Path(file_okay=False, exists=True),
                         help="The models/ folder (default: the checkout's)."),
        ]

    def parse(self, values, args):
        return types.SimpleNamespace(**values)

    def plan(self, value, plan, args):
        from ..demo import demo_inputs, demo_outputs

        plan.protect(demo_inputs(value.models_dir))
        plan.add_directory(value.out_dir)
        for path in demo_outputs(value.out_dir):
            plan.add(path, "--out")


@command(
    "demo",
    DemoArgs(),
    OutputArgs(),
    ReportArgs(plot="Write a per-layer PNG of the statistics before and after (needs the 'plot' extra)."),
    VerbosityArgs(),
)
def command(args) -> int:
    """Show on real data what bncal is for: a model with stale statistics, repaired and exported."""
    from ..demo import run_demo

    result = run_demo(args.demo.out_dir, models_dir=args.demo.models_dir, plot=args.report.plot, echo=args.ui.echo)
    if args.report.json:
        ReportArgs.write_json(args.report.json, result)
    if not (result.fold_export_passed and result.check_after_passed):
        raise BncalError("the demo did not end in a verified, consistent model; see the output above")
    return 0
