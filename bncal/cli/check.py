"""``bncal check``: do the moving statistics match the data, in onnxruntime (or Keras)?"""

from __future__ import annotations

import click

from .options import (DataArgs, ModelArgs, Options, OutputArgs, ProviderArgs, ReportArgs, ThresholdArgs, VerbosityArgs,
                      command)


@command(
    "check",
    ModelArgs(),
    DataArgs(required="the data whose batch statistics the model is checked against",
             batch_help="Batch size of the check (32 or more, shuffled)."),
    ThresholdArgs(),
    Options("check", click.Option(
        ["--allow-unchecked"], is_flag=True,
        help="Exit 0 when everything checked passed although some normalisation layers, lowered to arithmetic by "
             "a converter, could not be checked (verdict INCOMPLETE; exit 1 without this flag).")),
    ProviderArgs(),
    OutputArgs(),
    ReportArgs(plot="Write a per-layer PNG of mean shift and variance ratio (needs the 'plot' extra)."),
    VerbosityArgs(),
)
def command(args) -> int:
    """Check in onnxruntime that MODEL's moving statistics match the batch statistics of DATA.

    Per BN layer: mean shift and variance ratio of the moving statistics against the data's;
    per output: inference mode against train mode. Exit 1 when the statistics are stale, and
    when normalisation that a converter lowered to arithmetic could not be checked (verdict
    INCOMPLETE, see --allow-unchecked). MODEL is an .onnx file or a factory spec (exported
    with its BatchNorms kept; the report then also shows PyTorch-eval vs onnxruntime parity),
    or a .keras file (checked in Keras itself). Use batches of 32 or more.
    """
    from ..api import check
    from ..checking import CheckThresholds

    ui = args.ui
    fresh = args.model.kind.name == "torch" and args.model.weights is None  # a factory spec without weights
    if fresh:
        ui.warn(f"no --weights given: checking the factory's {FRESH_MODEL}")
    loaded = args.model.load()
    data = batches = args.data.numpy_batches(onnx_model=loaded.model if loaded.kind == "onnx" else None)
    if loaded.kind == "keras":
        from ..keras.data import in_model_layout

        batches = in_model_layout(data, loaded.model, images=args.data.is_image_folder,
                                  channels=args.data.image_options.channels)
    report = check(loaded.model, batches, thresholds=CheckThresholds(**args.thresholds),
                   max_samples=args.data.max_samples, progress=ui.interactive,
                   providers=None if loaded.kind == "keras" else args.providers.resolve())
    parity = report.parity
    report.notes += args.data.notes(data)
    if fresh:
        report.blame(f"the {FRESH_MODEL} (no --weights): give the trained weights with --weights")
    if parity is not None:
        ui.echo("PyTorch eval vs onnxruntime (exported graph):")
        ui.echo(parity.table())
        ui.echo("")
    ui.echo(report.table())
    if report.unchecked:
        ui.warn(f"{report.unchecked_count} normalisation layer{'s' if report.unchecked_count != 1 else ''} lowered "
                "to arithmetic by the converter could not be checked (bncal inspect MODEL: BN060)")
    for warning in report.warnings:
        ui.warn(warning)
    # A completed check writes its report whatever the verdict: the report is what a failure is read from.
    if args.report.json:
        ReportArgs.write_json(args.report.json, {"check": report, "parity": parity})
    if args.report.plot:
        from ..plot import plot_check

        plot_check({"moving vs data": report}, args.report.plot, model=args.model.display_name)
    ui.verdict(report.verdict_line())  # a failed parity fails the report too (CheckReport.with_parity)
    accepted = report.passed or (report.verdict == "INCOMPLETE" and args.check.allow_unchecked)
    return 0 if accepted else 1


FRESH_MODEL = "freshly initialised model, whose statistics are their initial values, not stale ones"
