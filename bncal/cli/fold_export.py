"""``bncal fold-export``: fold BN, export to ONNX, prove parity in onnxruntime."""

from __future__ import annotations

from collections import Counter
from itertools import islice

from ..errors import BncalError, DeploymentError, VerificationError
from .options import (DataArgs, ExportArgs, FoldArgs, GateArgs, GuardArgs, InputShapeArgs, ModelArgs, OutputArgs,
                      ReportArgs, ToleranceArgs, VerbosityArgs, VerificationArgs, command, shaped_example, torch_batches)


@command(
    "fold-export",
    ModelArgs(),
    DataArgs(batch_help="Batch size of the verification batches and of the train/inference check."),
    InputShapeArgs(),
    ToleranceArgs(),
    ExportArgs(),
    FoldArgs(),
    OutputArgs(help="Where to write the folded ONNX model.",
               suffixes=lambda args: ((".onnx",), "fold-export writes an ONNX model: give -o OUT.onnx")),
    VerificationArgs(),
    GateArgs(),
    GuardArgs(scored="the exported model in onnxruntime"),
    ReportArgs(plot="Write a PNG of each output's error against its tolerance, for the fold and the export "
                    "(needs the 'plot' extra)."),
    VerbosityArgs(),
)
def command(args) -> int:
    """Fold BatchNorm into neighbouring ops, export to ONNX, and prove parity in onnxruntime.

    MODEL is a factory spec (with --weights) or an .onnx file. A model that bncal inspect finds an
    error in (statistics never updated, degenerate statistics...) is refused unless --allow names
    the rule. The folded model is compared with
    the model, and its export with it in onnxruntime, on --data batches (or seeded random inputs
    of the model's own shape, --input-shape for dynamic dimensions); OUTPUT is written only if
    every output matches (default: within 1e-4 of its scale), else the exit status is 1. With
    --guard, the exported model must also keep its accuracy on held-out labelled data.
    """
    ui, verification = args.ui, args.verification
    if args.model.kind.name == "keras":
        raise BncalError(_KERAS_REFUSAL)
    data = args.data.load() if args.data.spec else None
    loaded = args.model.load()
    if loaded.kind == "keras":  # a factory returned a keras.Model
        raise BncalError(_KERAS_REFUSAL)
    progress = ui.progress if ui.interactive else False
    try:
        if loaded.kind == "onnx":
            report = _fold_export_onnx(args, loaded.model, data, progress)
        else:
            report = _fold_export_torch(args, loaded.model, data, progress)
    except (VerificationError, DeploymentError) as exc:
        from ..folding.export import FoldExportReport

        if isinstance(exc.report, FoldExportReport):  # the health gate's refusal is its own one line
            ui.echo(exc.report.table())
            ui.verdict(exc.report.verdict_line())
        raise
    ui.echo(report.table())
    check_report = None
    if data is not None and verification.run_check:
        check_report = _check(args, report, data, None if loaded.kind == "onnx" else loaded.model, progress)
    if args.report.json:
        ReportArgs.write_json(args.report.json, {"fold_export": report, "check": check_report})
    if args.report.plot:
        report.plot(args.report.plot, model=args.model.display_name)
    if check_report is not None and check_report.verdict == "FAILED":  # INCOMPLETE: lowered BNs, shown above
        ui.verdict("FAILED: the train/inference check of the exported model: "
                   + check_report.verdict_line().removeprefix("FAILED: "))
        if check_report.warnings:  # batches far from random draws: the check could not judge the statistics
            raise BncalError("the train/inference check cannot judge these batches (see the warning); shuffle the "
                             "data, or skip the check with --no-check")
        raise BncalError("the exported model's moving statistics do not match its batch statistics "
                         "(see the check above); recalibrate it first: bncal recalibrate MODEL --data DATA -o OUT")
    ui.verdict(report.verdict_line())
    # The whole run (loading, export, verification, check), not the fold-export step alone.
    ui.echo_after_commit(f"wrote {args.output.path} ({report.bytes_after} bytes) in {ui.elapsed():.2f} s")
    return 0


_KERAS_REFUSAL = (
    "fold-export takes a PyTorch model or an .onnx file, not a Keras model; recalibrate it in Keras (bncal "
    "recalibrate MODEL --data DATA -o fixed.keras), then export fixed.keras to ONNX yourself: Keras's "
    "model.export('model.onnx', format='onnx') lowers its BatchNorms to arithmetic, the recalibrated statistics folded in")


def _check(args, report, data, net, progress):
    """The train/inference check of the unfolded model on ``data`` (a PyTorch ``net``'s batches
    in its graph-input order), or None with a note when there is nothing to check."""
    from ..api import check
    from ..data import NumpyBatches
    from ..folding.export import fit_to_batch_size
    from ..onnx.view import find_batchnorms
    from ..onnx.runtime import fixed_batch_size, input_specs

    ui, original = args.ui, report.original
    infos = find_batchnorms(original)
    if not any(info.handled for info in infos):
        reasons = Counter(info.skip_reason for info in infos)
        kept = "; ".join(f"{count} of {len(infos)}: {reason}" for reason, count in reasons.items())
        ui.echo(f"\nnote: nothing to check: the model has no inference BatchNormalization with moving statistics"
                f"{f' ({kept})' if kept else ''}; the train/inference check was skipped")
        return None
    notes: list[str] = []
    batches = fit_to_batch_size(NumpyBatches(data if net is None else _Positional(data, net)), fixed_batch_size(input_specs(original)), notes)
    ui.progress("checking train mode vs inference mode in onnxruntime")
    check_report = check(original, batches, max_samples=args.data.max_samples, progress=bool(progress))
    check_report.notes += args.data.notes(data)
    ui.echo("\ntrain-mode vs inference-mode check (onnxruntime, original model):")
    for note in notes:
        ui.echo(f"note: {note}")
    ui.echo(check_report.table())
    for warning in check_report.warnings:
        ui.warn(warning)
    return check_report


def _fold_export_onnx(args, proto, data, progress):
    from ..data import NumpyBatches
    from ..folding.export import fold_export_onnx
    from ..onnx.runtime import batch_feeds

    initializers = {t.name for t in proto.graph.initializer}
    names = [i.name for i in proto.graph.input if i.name not in initializers]
    feeds = None
    if data is not None:
        feeds = [batch_feeds(b, names, index) for index, b in
                 enumerate(islice(NumpyBatches(data), args.verification.verify_batches))]
        if not feeds:
            raise BncalError("the data is empty; give at least one batch to verify on")
    shapes = args.shapes.ordered(names) if args.shapes else None
    _, report = fold_export_onnx(proto, args.output.path, verify_feeds=feeds, input_shapes=shapes,
                                 **ToleranceArgs.keywords(args.tolerance), bn_to_affine=args.fold.bn_to_affine,
                                 keep_failed=args.verification.keep_failed, latency_batches=args.verification.latency or (),
                                 treat_initializer_inputs_as_constant=args.fold.constant_initializer_inputs,
                                 progress=progress, allow=args.gate.allow, **_guard(args))
    return report


def _fold_export_torch(args, net, data, progress):
    from ..torch.export import forward_parameter_names, positional_inputs
    from ..folding.export import fold_export_torch

    batches, names = None, None
    if data is not None:
        named = [positional_inputs(net, b) for b in islice(torch_batches(data, net), args.verification.verify_batches)]
        if not named:
            raise BncalError("the data is empty; give at least one batch to verify on")
        batches, names = [inputs for inputs, _ in named], named[0][1]
        example = batches[0]
    elif args.shapes:
        example = shaped_example(args.shapes, net)
        names = (forward_parameter_names(net) or [])[:len(example)] if args.shapes.named else None
    else:
        raise BncalError("give --data or --input-shape so the model can be traced")
    # The check runs on the unfolded export: folding in the graph then costs one export, not two.
    checked = data is not None and args.verification.run_check
    export = args.export
    _, report = fold_export_torch(
        net, example, args.output.path, verify_batches=batches, **ToleranceArgs.keywords(args.tolerance),
        opset=export.opset, input_names=export.input_names or names, output_names=export.output_names,
        dynamic_batch=not export.static_batch, bn_to_affine=args.fold.bn_to_affine,
        keep_failed=args.verification.keep_failed, latency_batches=args.verification.latency or (),
        module_fold=not checked, progress=progress, allow=args.gate.allow, **_guard(args))
    return report


def _guard(args) -> dict:
    """The accuracy guard's keywords of :func:`bncal.fold_export_torch` / ``fold_export_onnx``."""
    return dict(guard=args.guard.batches(args.data), metric=args.guard.metric, guard_tol=args.guard.tol)


class _Positional:
    """Batches as a PyTorch model's positional inputs (the exported graph's input order)."""

    def __init__(self, data, net):
        self.data, self.net = data, net

    def __iter__(self):
        from ..torch.export import positional_inputs

        for batch in self.data:
            yield positional_inputs(self.net, batch)[0]
