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
    Options("inspect", click.Option(["--strict"], type=click.Choice(["info", "warning", "error"]), default="error",
                                    show_default=True,
                                    help="Exit 1 when a finding reaches this severity (warning or info: stricter).")),
    OutputArgs(),
    ReportArgs(),
    VerbosityArgs(),
)
def command(args) -> int:
    """Diagnose MODEL's BatchNorm layers: statistics, momentum, scale/shift, dropout order, folding.

    MODEL is an .onnx file or a factory spec (with --weights). With --input-shape, a PyTorch
    model's foldability is analysed too. Exit 1 when a finding is an error (such as BN001,
    statistics never updated), or reaches the --strict severity.
    """
    from ..inspection import SEVERITIES, inspect_model

    loaded = args.model.load()
    target, example, decisions = loaded.model, None, None
    if loaded.kind == "onnx":
        from ..folding import fold_onnx

        decisions = fold_onnx(target)[1]
    elif args.shapes:
        from ..folding import analyze_foldability

        example = random_inputs(args.shapes)
        decisions = analyze_foldability(target, example)
    training = args.training
    report = inspect_model(target, batch_size=training.batch_size, dataset_size=training.dataset_size,
                           epochs=training.epochs, example_inputs=example, fold_decisions=decisions)
    args.ui.echo(report.table())
    if args.report.json:
        ReportArgs.write_json(args.report.json, report)
    worst, strict = report.max_severity(), args.inspect.strict
    return 1 if worst is not None and SEVERITIES.index(worst) >= SEVERITIES.index(strict) else 0
