"""``bncal recalibrate``: exact moving statistics from calibration data (PyTorch, ONNX or Keras)."""

from __future__ import annotations

from ..errors import BncalError, DeploymentError
from .options import (DataArgs, DeviceArgs, GateArgs, GuardArgs, ModelArgs, OutputArgs, ProviderArgs, RecalibrationArgs,
                      ReportArgs, VerbosityArgs, command, torch_batches)


_SUFFIX_HINTS = {
    "onnx": "an .onnx model is recalibrated into an .onnx file: give -o OUT.onnx",
    "keras": "a Keras model is recalibrated into a .keras file: give -o OUT.keras (or OUT.h5 for Keras 2 readers)",
    "torch": "a PyTorch model's recalibrated weights are a state dict (.safetensors or .pt); for an ONNX file use "
             "bncal fold-export",
}


def _recalibrated_suffixes(args):
    from ..loading import output_suffixes

    hint = _SUFFIX_HINTS[args.model.kind.name]
    if args.model.kind.name == "torch":
        hint += "; a factory returning a keras.Model is written as OUT.keras"
    return output_suffixes(args.model.spec), hint


def _require_suffix(loaded, output) -> None:
    """The output suffix fits the kind the model turned out to be (a factory spec decides on loading)."""
    from ..loading import kind_named

    if output.suffix.lower() not in kind_named(loaded.kind).saves_as:
        raise BncalError(f"{loaded.spec} gives a {'keras.Model' if loaded.kind == 'keras' else 'PyTorch model'}: "
                         f"{_SUFFIX_HINTS[loaded.kind]}")


@command(
    "recalibrate",
    ModelArgs(),
    DataArgs(required="the calibration data to compute statistics from", batch_help="Calibration batch size."),
    RecalibrationArgs(),
    DeviceArgs(),
    ProviderArgs(torch_models=False),
    OutputArgs(help="Where to write the recalibrated weights (.safetensors or .pt) or model (.onnx, .keras, .h5).",
               suffixes=_recalibrated_suffixes),
    GateArgs(repairs="; the recalibrated model is judged, so statistics it repairs (BN001, BN002) need no --allow"),
    GuardArgs(scored="the recalibrated model"),
    ReportArgs(plot="Write a per-layer PNG of mean shift and variance ratio (needs the 'plot' extra)."),
    VerbosityArgs(),
)
def command(args) -> int:
    """Recompute the moving statistics of MODEL's BatchNorm layers from calibration data.

    MODEL is a factory spec (package.module:factory or path/file.py:factory, with --weights),
    an .onnx file (run in onnxruntime on --providers) or a Keras file (.keras, .h5, .hdf5; written to
    OUTPUT.keras or .h5; a factory returning a keras.Model takes .weights.h5 weights). Under torchrun, each rank reads
    its shard of the data, the statistics are combined exactly across ranks, and rank 0 writes
    OUTPUT (PyTorch and ONNX models). The recalibrated model is written only if bncal inspect finds
    no error in it (what recalibration cannot repair, such as a training-mode BatchNormalization),
    unless --allow names the rule; with --guard, only if it keeps its accuracy on held-out labelled data.
    """
    ui, output = args.ui, args.output.path
    try:
        if args.model.kind.name == "onnx":
            report, is_main = _recalibrate_onnx(args)
        elif args.model.kind.name == "keras":
            report, is_main = _recalibrate_keras(args, args.model.load()), True
        else:
            report, is_main = _recalibrate_torch(args)
    except DeploymentError as exc:
        from ..report import RecalibrationReport

        if isinstance(exc.report, RecalibrationReport):  # the accuracy guard: what it measured, then the reason
            ui.echo(exc.report.table())
        raise
    if not is_main:
        return 0
    ui.echo(report.table())
    for warning in report.warnings:
        ui.warn(warning)
    summary = f"recalibrated {len(report.layers)} BatchNorm layers from {report.samples} samples in {report.batches} batches"
    summary += f", {report.passes} pass{'es' if report.passes != 1 else ''}"
    if report.world_size > 1:
        summary += f" on {report.world_size} ranks"
    if args.recalibration.mode == "eval":
        summary += f" ({'converged' if report.converged else 'NOT converged'}: last change {report.max_rel_change:.2e})"
    ui.echo(summary)
    ui.verdict(summary)  # no PASSED: recalibration computes statistics, it verifies nothing
    ui.echo_after_commit(f"wrote {output}")
    if args.report.json:
        ReportArgs.write_json(args.report.json, report)
    if args.report.plot:
        from ..plot import plot_recalibration

        plot_recalibration(report, args.report.plot, model=args.model.display_name)
    return 0


def _guard(args) -> dict:
    """The accuracy guard's keywords of :func:`bncal.recalibrate` / ``recalibrate_onnx``."""
    return dict(guard=args.guard.batches(args.data), metric=args.guard.metric, guard_tol=args.guard.tol)


def _recalibrate_torch(args):
    from ..distributed import torchrun_process_group
    from ..gate import require_healthy_notes
    from ..torch.loading import is_whole_model_file, save_state_dict
    from ..torch.recalibration import recalibrate

    options = args.recalibration
    with torchrun_process_group(args.device) as launch:
        if args.model.weights is None and not is_whole_model_file(args.model.spec) and launch.is_main:
            args.ui.warn("no --weights given; recalibrating the factory's freshly initialised model")
        loaded = args.model.load()
        if loaded.kind == "keras":  # the factory returned a keras.Model
            return _recalibrate_keras(args, loaded), True
        _require_suffix(loaded, args.output.path)
        net = loaded.model
        if launch.device is not None:
            net.to(launch.device)
        data = args.data.load(rank=launch.rank, world_size=launch.world_size)
        report = recalibrate(net, torch_batches(data, net), mode=options.mode, prior=options.prior,
                             max_samples=launch.shard_limit(args.data.max_samples), tol=options.tol,
                             max_passes=options.max_passes, cache_mb=options.cache_mb, spill_dir=options.spill_dir,
                             progress=args.ui.interactive and launch.is_main, **_guard(args))
        report.notes += args.data.notes(data)
        report.notes += require_healthy_notes(net, allow=args.gate.allow, action="write it")
        if launch.is_main:
            net.to("cpu")
            save_state_dict(net, args.output.path)
    return report, launch.is_main


def _recalibrate_keras(args, loaded):
    from ..distributed import environment
    from ..gate import require_healthy_notes
    from ..keras import recalibrate, save_model
    from ..keras.data import in_model_layout

    if environment().distributed:
        raise BncalError("a Keras model is recalibrated in one process; run bncal without torchrun")
    if args.guard.spec:
        raise BncalError("--guard scores PyTorch and ONNX models; for a Keras model, score the recalibrated .keras "
                         "file on your held-out data yourself")
    _require_suffix(loaded, args.output.path)
    options = args.recalibration
    batches = in_model_layout(args.data.numpy_batches(), loaded.model, images=args.data.is_image_folder,
                              channels=args.data.image_options.channels)
    report = recalibrate(loaded.model, batches, mode=options.mode, prior=options.prior, batch_size=None,
                         max_samples=args.data.max_samples, tol=options.tol, max_passes=options.max_passes,
                         progress=args.ui.interactive)
    report.notes += require_healthy_notes(loaded.model, allow=args.gate.allow, action="write it")
    save_model(loaded.model, args.output.path)
    return report


def _recalibrate_onnx(args):
    from ..distributed import torchrun_process_group
    from ..gate import require_healthy_notes
    from ..onnx.io import save_onnx
    from ..onnx.recalibration import recalibrate_onnx

    options = args.recalibration
    # The moments are combined on the host: a gloo group (device "cpu"), whatever runs onnxruntime.
    with torchrun_process_group("cpu") as launch:
        proto = args.model.load().model
        providers = args.providers.resolve(launch.local_rank if launch.distributed else None)
        batches = args.data.numpy_batches(rank=launch.rank, world_size=launch.world_size, onnx_model=proto)
        new_model, report = recalibrate_onnx(proto, batches, mode=options.mode, prior=options.prior, tol=options.tol,
                                             max_passes=options.max_passes,
                                             max_samples=launch.shard_limit(args.data.max_samples),
                                             providers=providers, progress=args.ui.interactive and launch.is_main,
                                             **_guard(args))
        report.notes += args.data.notes(batches)
        report.notes += require_healthy_notes(new_model, allow=args.gate.allow, action="write it")
        if launch.is_main:
            save_onnx(new_model, args.output.path)
    return report, launch.is_main
