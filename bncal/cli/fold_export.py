"""``bncal fold-export``: fold BN, export to ONNX, prove parity in onnxruntime."""

from __future__ import annotations

from collections import Counter
from itertools import islice

from ..errors import BncalError, VerificationError
from .options import (DataArgs, ExportArgs, FoldArgs, InputShapeArgs, ModelArgs, OutputArgs, ReportArgs, ToleranceArgs,
                      VerbosityArgs, VerificationArgs, as_inputs, command, random_inputs, torch_batches)


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
    ReportArgs(),
    VerbosityArgs(),
)
def command(args) -> int:
    """Fold BatchNorm into neighbouring ops, export to ONNX, and prove parity in onnxruntime.

    MODEL is a factory spec (with --weights) or an .onnx file. The folded graph is compared with
    the unfolded one, and the unfolded export with PyTorch, on --data batches (or seeded random
    inputs of the model's own shape, --input-shape for dynamic dimensions); OUTPUT is written
    only if every output matches (default: within 1e-4 of its scale), else the exit status is 1.
    """
    ui, verification = args.ui, args.verification
    data = args.data.load() if args.data.spec else None
    loaded = args.model.load()
    progress = ui.progress if ui.interactive else False
    try:
        if loaded.kind == "onnx":
            report = _fold_export_onnx(args, loaded.model, data, progress)
        else:
            report = _fold_export_torch(args, loaded.model, data, progress)
    except VerificationError as exc:
        ui.echo(exc.report.table())
        raise
    ui.echo(report.table())
    check_report = None
    if data is not None and verification.run_check:
        check_report = _check(args, report, progress)
    if args.report.json:
        ReportArgs.write_json(args.report.json, {"fold_export": report, "check": check_report})
    if check_report is not None and not check_report.passed:
        raise BncalError("the exported model's moving statistics do not match its batch statistics "
                         "(see the check above); recalibrate it first: bncal recalibrate MODEL --data DATA -o OUT")
    ui.echo_after_commit(f"wrote {args.output.path} ({report.bytes_after} bytes) in {report.seconds:.2f} s")
    return 0


def _check(args, report, progress):
    """The train/inference check of the unfolded model on --data, or None with a note when there is nothing to check."""
    from ..check import check_onnx
    from ..data import NumpyBatches
    from ..fold_export import fit_to_batch_size, fixed_batch_size
    from ..onnx_graphs import find_batchnorms
    from ..runtime import input_specs

    ui, original = args.ui, report.original
    infos = find_batchnorms(original)
    if not any(info.handled for info in infos):
        reasons = Counter(info.skip_reason for info in infos)
        kept = "; ".join(f"{count} of {len(infos)}: {reason}" for reason, count in reasons.items())
        ui.echo(f"\nnote: nothing to check: the model has no inference BatchNormalization with moving statistics"
                f"{f' ({kept})' if kept else ''}; the train/inference check was skipped")
        return None
    notes: list[str] = []
    batches = fit_to_batch_size(NumpyBatches(args.data.load()), fixed_batch_size(input_specs(original)), notes)
    ui.progress("checking train mode vs inference mode in onnxruntime")
    check_report = check_onnx(original, batches, max_samples=args.data.max_samples, progress=bool(progress))
    ui.echo("\ntrain-mode vs inference-mode check (onnxruntime, original model):")
    for note in notes:
        ui.echo(f"note: {note}")
    ui.echo(check_report.table())
    return check_report


def _fold_export_onnx(args, proto, data, progress):
    from ..fold_export import fold_export_onnx

    feeds = None
    if data is not None:
        feeds = [_as_feeds(b) for b in islice(data, args.verification.verify_batches)]
        if not feeds:
            raise BncalError("the data is empty; give at least one batch to verify on")
    _, report = fold_export_onnx(proto, args.output.path, verify_feeds=feeds, input_shapes=args.shapes or None,
                                 **ToleranceArgs.keywords(args.tolerance), bn_to_affine=args.fold.bn_to_affine,
                                 keep_failed=args.verification.keep_failed, latency_batches=args.verification.latency or (),
                                 treat_initializer_inputs_as_constant=args.fold.constant_initializer_inputs,
                                 progress=progress)
    return report


def _fold_export_torch(args, net, data, progress):
    from ..fold_export import fold_export_torch

    batches = None
    if data is not None:
        batches = [as_inputs(b) for b in islice(torch_batches(data, net), args.verification.verify_batches)]
        if not batches:
            raise BncalError("the data is empty; give at least one batch to verify on")
        example = batches[0]
    elif args.shapes:
        example = random_inputs(args.shapes)
    else:
        raise BncalError("give --data or --input-shape so the model can be traced")
    export = args.export
    _, report = fold_export_torch(
        net, example, args.output.path, verify_batches=batches, **ToleranceArgs.keywords(args.tolerance),
        opset=export.opset, input_names=export.input_names, output_names=export.output_names,
        dynamic_batch=not export.static_batch, bn_to_affine=args.fold.bn_to_affine,
        keep_failed=args.verification.keep_failed, latency_batches=args.verification.latency or (), progress=progress)
    return report


def _as_feeds(batch):
    """A data batch as onnxruntime feeds: a dict as it is, positional arrays as a tuple (matched to the
    graph inputs by position in the library)."""
    import numpy as np

    if isinstance(batch, dict):
        return {k: np.asarray(v) for k, v in batch.items()}
    return tuple(v.detach().cpu().numpy() if hasattr(v, "detach") else np.asarray(v) for v in as_inputs(batch))
