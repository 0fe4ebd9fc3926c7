"""``bncal inspect``: what is wrong with this BN setup?"""

from __future__ import annotations

import click

from .options import (InputShapeArgs, ModelArgs, Options, OutputArgs, ReportArgs, TrainingArgs, VerbosityArgs, command,
                      random_inputs)


@command(
    "inspect",
    ModelArgs(),
    TrainingArgs(),
    InputShapeArgs(),
    Options("inspect", click.Option(["--strict"], type=click.Choice(["info", "warning", "error"]), default=None,
                                    help="Exit 1 when a finding reaches this severity.")),
    OutputArgs(),
    ReportArgs(),
    VerbosityArgs(),
)
def command(args) -> int:
    """Diagnose MODEL's BatchNorm layers: statistics, momentum, scale/shift, dropout order, folding.

    MODEL is an .onnx file or a factory spec (with --weights). With --input-shape, a PyTorch
    model's foldability is analysed too.
    """
    from ..inspection import SEVERITIES, inspect_model

    loaded = args.model.load()
    target, example, decisions = loaded.model, None, None
    if loaded.kind == "onnx":
        from ..onnx_fold import fold_onnx

        decisions = fold_onnx(target)[1]
    elif args.shapes:
        from ..folding import analyze_foldability

        from ..export import forward_parameter_names

        example = random_inputs(args.shapes.ordered(forward_parameter_names(target) or [], prefix=True))
        decisions = analyze_foldability(target, example)
    training = args.training
    report = inspect_model(target, batch_size=training.batch_size, dataset_size=training.dataset_size,
                           epochs=training.epochs, example_inputs=example, fold_decisions=decisions)
    args.ui.echo(report.table())
    if args.report.json:
        ReportArgs.write_json(args.report.json, report)
    worst, strict = report.max_severity(), args.inspect.strict
    if strict and worst is not None and SEVERITIES.index(worst) >= SEVERITIES.index(strict):
        return 1
    return 0
