"""``bncal inspect``: what is wrong with this BN setup?"""

from __future__ import annotations

import click

from .options import (InputShapeArgs, ModelArgs, Options, OutputArgs, ReportArgs, TrainingArgs, VerbosityArgs, command,
                      shaped_example)


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

    MODEL is an .onnx file, a .keras file or a factory spec (with --weights). With --input-shape,
    a PyTorch model's foldability is analysed too (for a subclassed Keras model: the order its
    layers run in). Exit 1 when a finding is an error (such as BN001, statistics never
    updated), or reaches the --strict severity.
    """
    from ..inspect import SEVERITIES, inspect_model

    loaded = args.model.load()
    target, example, decisions = loaded.model, None, None
    if loaded.kind == "keras":
        import numpy as np

        rng = np.random.default_rng(0)
        # A subclassed model has no symbolic inputs: then only positional shapes can apply.
        names = [getattr(t, "name", f"input_{i}") for i, t in enumerate(getattr(target, "inputs", None) or [])]
        shapes = args.shapes.ordered(names, prefix=not names) if args.shapes else []
        arrays = [rng.standard_normal(shape).astype("float32") for shape in shapes]
        example = (arrays[0] if len(arrays) == 1 else arrays) if arrays else None
    elif loaded.kind == "onnx":
        from ..folding import fold_onnx

        decisions = fold_onnx(target)[1]
    elif args.shapes:
        from ..folding import analyze_foldability

        example = shaped_example(args.shapes, target)
        decisions = analyze_foldability(target, example)
    training = args.training
    report = inspect_model(target, batch_size=training.batch_size, dataset_size=training.dataset_size,
                           epochs=training.epochs, example_inputs=example, fold_decisions=decisions)
    args.ui.echo(report.table())
    if args.report.json:
        ReportArgs.write_json(args.report.json, report)
    worst, strict = report.max_severity(), args.inspect.strict
    failed = worst is not None and SEVERITIES.index(worst) >= SEVERITIES.index(strict)
    args.ui.verdict(report.verdict_line(failed))
    return 1 if failed else 0
