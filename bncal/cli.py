"""The ``bncal`` command line: a thin layer over the library.

Heavy modules (torch, onnx, onnxruntime) are imported inside the commands, so ``--help``
stays fast. User-facing errors (:class:`bncal.errors.BncalError`) print one line and exit 1;
``-v`` shows the traceback. Usage errors exit 2 (click's convention).
"""

from __future__ import annotations

import functools
import json
import os
import sys
import traceback

import click

from .errors import BncalError


class _State:
    verbose = False


def _fail(message: str) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(1)


def handle_errors(func):
    """Turn exceptions into one-line messages with exit status 1 (tracebacks with -v)."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except BncalError as exc:
            if _State.verbose:
                traceback.print_exc()
            _fail(str(exc))
        except KeyboardInterrupt:
            _fail("interrupted")
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException, SystemExit):
            raise
        except Exception as exc:  # an unexpected failure still gets one line, and no partial output
            if _State.verbose:
                traceback.print_exc()
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            _fail(f"{type(exc).__name__}: {first} (run with -v for the traceback)")

    return wrapper


# Reusable option groups, shared by the subcommands.
def model_options(func):
    options = [
        click.option("--weights", type=click.Path(dir_okay=False), help="Weights: .safetensors, or a .pt/.pth state dict (read with weights_only=True)."),
        click.option("--model-kwargs", metavar="JSON", help="Keyword arguments for the model factory, as a JSON object."),
        click.option("--allow-pickle", is_flag=True, help="Allow loading files that execute code (pickled modules, pickled checkpoints). Only for files you trust."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def data_options(func):
    options = [
        click.option("--data", "data_spec", metavar="DATA", help="Calibration data: .npy, .npz (arrays by input name), an image folder, or file.py:func / module:func."),
        click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True),
        click.option("--max-samples", type=click.IntRange(min=1), help="Use at most this many samples."),
        click.option("--image-size", nargs=2, type=int, metavar="H W", help="Resize images to H x W (image folders)."),
        click.option("--channels", type=click.Choice(["1", "3"]), default="3", show_default=True, help="Image channels (image folders)."),
        click.option("--mean", "norm_mean", metavar="M[,M,M]", default="0", show_default=True, help="Per-channel mean after scaling to [0, 1] (image folders)."),
        click.option("--std", "norm_std", metavar="S[,S,S]", default="1", show_default=True, help="Per-channel std (image folders)."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def report_options(func):
    func = click.option("--report-json", type=click.Path(dir_okay=False), help="Also write the report as JSON to this path.")(func)
    return func


def _image_options(image_size, channels, norm_mean, norm_std):
    from .data import ImageOptions

    def floats(text, name):
        try:
            return tuple(float(v) for v in text.split(","))
        except ValueError:
            raise BncalError(f"{name} takes comma-separated numbers, not {text!r}") from None

    return ImageOptions(size=tuple(image_size) if image_size else None, channels=int(channels),
                        mean=floats(norm_mean, "--mean"), std=floats(norm_std, "--std"))


def _write_json(path, value) -> None:
    from ._io import atomic_output
    from .report import to_jsonable

    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(to_jsonable(value), indent=2) + "\n")


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("-v", "--verbose", is_flag=True, help="Show tracebacks on errors.")
@click.version_option(package_name="bncal")
def main(verbose: bool) -> None:
    """bncal: make BatchNorm networks safe to deploy.

    Recalibrate moving statistics exactly, fold BN and export to ONNX with proof of parity
    in onnxruntime, check train-mode vs inference-mode agreement, and diagnose BN setups.
    """
    _State.verbose = verbose


@main.command()
@click.argument("model")
@model_options
@data_options
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Where to write the recalibrated weights (.safetensors or .pt) or model (.onnx).")
@click.option("--mode", type=click.Choice(["train", "eval"]), default="train", show_default=True,
              help="train: BN uses batch statistics during the pass (PreciseBN). eval: inference-consistent fixed point.")
@click.option("--tol", type=float, default=1e-5, show_default=True, help="eval mode: stop when statistics change less than this (relative).")
@click.option("--max-passes", type=click.IntRange(min=1), default=None,
              help="eval mode: at most this many passes over the data (default: number of BN layers + 1, where the result is exact).")
@click.option("--device", default=None, help="Device for the PyTorch pass (cpu, cuda, cuda:1); default: cuda:LOCAL_RANK under torchrun with CUDA, else cpu.")
@click.option("--force", is_flag=True, help="Replace an existing output file.")
@click.option("--plot", type=click.Path(dir_okay=False), help="Write a per-layer PNG of mean shift and variance ratio (needs the 'plot' extra).")
@report_options
@click.option("-q", "--quiet", is_flag=True, help="Print no table.")
@handle_errors
def recalibrate(model, weights, model_kwargs, allow_pickle, data_spec, batch_size, max_samples, image_size, channels,
                norm_mean, norm_std, output, mode, tol, max_passes, device, force, plot, report_json, quiet):
    """Recompute the moving statistics of MODEL's BatchNorm layers from calibration data.

    MODEL is a factory spec (package.module:factory or path/file.py:factory, with --weights)
    or an .onnx file. Under torchrun, each rank reads its shard of the data, the statistics
    are combined exactly across ranks, and rank 0 writes OUTPUT.
    """
    from ._io import check_output_path
    from .loading import is_onnx_path

    if not data_spec:
        raise BncalError("--data is required: the calibration data to compute statistics from")
    image_options = _image_options(image_size, channels, norm_mean, norm_std)
    check_output_path(output, force=force, inputs=[model, weights, data_spec])
    if is_onnx_path(model):
        report = _recalibrate_onnx(model, data_spec, output, batch_size, max_samples, image_options, mode, tol, max_passes)
        rank = 0
    else:
        report, rank = _recalibrate_torch(model, weights, model_kwargs, allow_pickle, data_spec, batch_size, max_samples,
                                          image_options, output, mode, tol, max_passes, device)
    if rank != 0:
        return
    if not quiet:
        click.echo(report.table())
        summary = f"recalibrated {len(report.layers)} BatchNorm layers from {report.samples} samples in {report.batches} batches"
        summary += f", {report.passes} pass{'es' if report.passes != 1 else ''}"
        if report.world_size > 1:
            summary += f" on {report.world_size} ranks"
        if mode == "eval":
            summary += f" ({'converged' if report.converged else 'NOT converged'}: last change {report.max_rel_change:.2e})"
        click.echo(summary)
        click.echo(f"wrote {output}")
    if report_json:
        _write_json(report_json, report)
    if plot:
        from .plot import plot_recalibration

        plot_recalibration(report, plot)


def _recalibrate_torch(model_spec, weights, model_kwargs, allow_pickle, data_spec, batch_size, max_samples, image_options,
                       output, mode, tol, max_passes, device):
    import torch

    from .data import TorchBatches, load_data
    from .loading import load_model, save_state_dict
    from .recalibration import recalibrate as run_recalibration

    if weights is None:
        click.echo("warning: no --weights given; recalibrating the factory's freshly initialised model", err=True)
    distributed = _init_distributed(device)
    rank, world = (torch.distributed.get_rank(), torch.distributed.get_world_size()) if distributed else (0, 1)
    try:
        net = load_model(model_spec, weights=weights, model_kwargs=model_kwargs, allow_pickle=allow_pickle)
        if device is None and distributed and torch.cuda.is_available():
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        if device is not None:
            net.to(device)
        dtype = next((p.dtype for p in net.parameters() if p.is_floating_point()), torch.float32)
        batches = TorchBatches(load_data(data_spec, batch_size=batch_size, rank=rank, world_size=world,
                                         image_options=image_options), dtype)
        interactive = sys.stderr.isatty() and rank == 0
        report = run_recalibration(net, batches, mode=mode, max_samples=_shard_limit(max_samples, rank, world),
                                   tol=tol, max_passes=max_passes, progress=interactive)
        if rank == 0:
            net.to("cpu")
            if str(output).lower().endswith(".onnx"):
                raise BncalError("a PyTorch model's recalibrated weights go to .safetensors or .pt; use fold-export for ONNX")
            save_state_dict(net, output)
        return report, rank
    finally:
        if distributed:
            torch.distributed.destroy_process_group()


def _shard_limit(max_samples, rank, world):
    if max_samples is None:
        return None
    return max_samples * (rank + 1) // world - max_samples * rank // world


def _init_distributed(device) -> bool:
    """Join the torchrun process group when launched with more than one rank."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return True
    use_cuda = (device or "").startswith("cuda") or (device is None and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return True


def _recalibrate_onnx(model_path, data_spec, output, batch_size, max_samples, image_options, mode, tol, max_passes):
    from .data import NumpyBatches, load_data
    from .onnx_io import load_onnx, save_onnx
    from .onnx_recalibrate import recalibrate_onnx

    if not str(output).lower().endswith(".onnx"):
        raise BncalError("an .onnx model is recalibrated into an .onnx file; give -o OUT.onnx")
    proto = load_onnx(model_path)
    batches = NumpyBatches(load_data(data_spec, batch_size=batch_size, image_options=image_options))
    new_model, report = recalibrate_onnx(proto, batches, mode=mode, tol=tol, max_passes=max_passes,
                                         max_samples=max_samples, progress=sys.stderr.isatty())
    save_onnx(new_model, output)
    return report


def input_shape_option(func):
    return click.option("--input-shape", "input_shapes", multiple=True, metavar="N,C,H,W",
                        help="Shape of a model input for seeded random inputs (repeat for several inputs).")(func)


def _parse_shapes(input_shapes) -> list[tuple[int, ...]]:
    shapes = []
    for text in input_shapes:
        try:
            shape = tuple(int(v) for v in text.replace("x", ",").split(","))
        except ValueError:
            raise BncalError(f"--input-shape takes comma-separated integers such as 1,3,224,224, not {text!r}") from None
        if not shape or any(d < 1 for d in shape):
            raise BncalError(f"--input-shape {text!r} needs positive dimensions")
        shapes.append(shape)
    return shapes


def _example_inputs(batches, input_shapes, seed: int = 0) -> tuple:
    """Example inputs for tracing/export: the first data batch, or seeded random tensors."""
    import torch

    if batches is not None:
        for batch in batches:
            if isinstance(batch, dict):
                return tuple(batch.values())
            return tuple(batch) if isinstance(batch, (list, tuple)) else (batch,)
        raise BncalError("the calibration data is empty; give at least one batch")
    shapes = _parse_shapes(input_shapes)
    if not shapes:
        raise BncalError("give --data or --input-shape so the model can be traced")
    generator = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(shape, generator=generator) for shape in shapes)


@main.command("inspect")
@click.argument("model")
@model_options
@click.option("--batch-size", type=click.IntRange(min=1), help="Training batch size per device (momentum and batch renormalisation rules).")
@click.option("--dataset-size", type=click.IntRange(min=1), help="Training samples per epoch (momentum rule).")
@click.option("--epochs", type=click.FloatRange(min=0, min_open=True), default=1, show_default=True)
@input_shape_option
@click.option("--strict", type=click.Choice(["info", "warning", "error"]), default=None,
              help="Exit 1 when a finding reaches this severity.")
@report_options
@handle_errors
def inspect_command(model, weights, model_kwargs, allow_pickle, batch_size, dataset_size, epochs, input_shapes, strict, report_json):
    """Diagnose MODEL's BatchNorm layers: statistics, momentum, scale/shift, dropout order, folding.

    MODEL is an .onnx file or a factory spec (with --weights). With --input-shape, a PyTorch
    model's foldability is analysed too.
    """
    from .inspection import SEVERITIES, inspect_model
    from .loading import is_onnx_path

    if is_onnx_path(model):
        from .folding import fold_onnx
        from .onnx_io import load_onnx

        target = load_onnx(model)
        decisions = fold_onnx(target)[1]
        example = None
    else:
        from .folding import analyze_foldability
        from .loading import load_model

        target = load_model(model, weights=weights, model_kwargs=model_kwargs, allow_pickle=allow_pickle)
        example = _example_inputs(None, input_shapes) if input_shapes else None
        decisions = analyze_foldability(target, example) if example is not None else None
    report = inspect_model(target, batch_size=batch_size, dataset_size=dataset_size, epochs=epochs,
                           example_inputs=example, fold_decisions=decisions)
    click.echo(report.table())
    if report_json:
        _write_json(report_json, report)
    worst = report.max_severity()
    if strict and worst is not None and SEVERITIES.index(worst) >= SEVERITIES.index(strict):
        sys.exit(1)


def _names_list(text):
    return [n.strip() for n in text.split(",") if n.strip()] if text else None


@main.command("fold-export")
@click.argument("model")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Where to write the folded ONNX model.")
@model_options
@data_options
@input_shape_option
@click.option("--verify-batches", type=click.IntRange(min=1), default=3, show_default=True, help="Batches of --data to verify on.")
@click.option("--atol", type=float, default=1e-5, show_default=True)
@click.option("--rtol", type=float, default=1e-4, show_default=True)
@click.option("--opset", type=int, help="ONNX opset for the export (default: the exporter's).")
@click.option("--input-names", help="Comma-separated graph input names.")
@click.option("--output-names", help="Comma-separated graph output names.")
@click.option("--static-batch", is_flag=True, help="Export a fixed batch size instead of a dynamic batch axis.")
@click.option("--bn-to-affine", is_flag=True, help="Turn BNs that cannot be folded into Mul + Add.")
@click.option("--keep-failed", is_flag=True, help="If verification fails, keep the model as <stem>.FAILED-VERIFICATION.onnx.")
@click.option("--constant-initializer-inputs", is_flag=True,
              help="ONNX input: fold parameters that are also graph inputs (IR < 4 files), treating them as constants.")
@click.option("--check/--no-check", "run_check", default=True, show_default=True,
              help="With --data: also check train-mode vs inference-mode agreement in onnxruntime.")
@click.option("--force", is_flag=True, help="Replace an existing output file.")
@report_options
@handle_errors
def fold_export(model, output, weights, model_kwargs, allow_pickle, data_spec, batch_size, max_samples, image_size, channels,
                norm_mean, norm_std, input_shapes, verify_batches, atol, rtol, opset, input_names, output_names, static_batch,
                bn_to_affine, keep_failed, constant_initializer_inputs, run_check, force, report_json):
    """Fold BatchNorm into neighbouring ops, export to ONNX, and prove parity in onnxruntime.

    MODEL is a factory spec (with --weights) or an .onnx file. The folded model is compared
    with the original on --data batches (or seeded random --input-shape inputs); OUTPUT is
    written only if every output matches within --atol/--rtol, else the exit status is 1.
    """
    from itertools import islice

    from ._io import check_output_path
    from .errors import VerificationError
    from .loading import is_onnx_path

    check_output_path(output, force=force, inputs=[model, weights, data_spec])
    image_options = _image_options(image_size, channels, norm_mean, norm_std)
    data = None
    if data_spec:
        from .data import load_data

        data = load_data(data_spec, batch_size=batch_size, image_options=image_options)
    check_report = None
    try:
        if is_onnx_path(model):
            from .fold_export import fold_export_onnx
            from .onnx_io import load_onnx

            proto = load_onnx(model)
            feeds = None
            if data is not None:
                names = [i.name for i in proto.graph.input if i.name not in {t.name for t in proto.graph.initializer}]
                feeds = [_as_feeds(b, names) for b in islice(data, verify_batches)]
            elif input_shapes:
                names = [i.name for i in proto.graph.input if i.name not in {t.name for t in proto.graph.initializer}]
                feeds = [{n: x.numpy() for n, x in zip(names, _example_inputs(None, input_shapes, seed=s))} for s in range(2)]
            folded, report = fold_export_onnx(proto, output, verify_feeds=feeds, atol=atol, rtol=rtol,
                                              bn_to_affine=bn_to_affine, keep_failed=keep_failed,
                                              treat_initializer_inputs_as_constant=constant_initializer_inputs)
            if data is not None and run_check:
                check_report = _check_onnx_model(proto, data, max_samples)
        else:
            import torch

            from .data import TorchBatches
            from .fold_export import fold_export_torch
            from .loading import load_model

            net = load_model(model, weights=weights, model_kwargs=model_kwargs, allow_pickle=allow_pickle)
            dtype = next((p.dtype for p in net.parameters() if p.is_floating_point()), torch.float32)
            batches = [_as_tuple(b) for b in islice(TorchBatches(data, dtype), verify_batches)] if data is not None else None
            example = batches[0] if batches else _example_inputs(None, input_shapes)
            folded, report = fold_export_torch(
                net, example, output, verify_batches=batches, atol=atol, rtol=rtol, opset=opset,
                input_names=_names_list(input_names), output_names=_names_list(output_names),
                dynamic_batch=not static_batch, bn_to_affine=bn_to_affine, keep_failed=keep_failed)
            if data is not None and run_check:
                check_report = _check_onnx_model(report.original, data, max_samples)
    except VerificationError as exc:
        click.echo(exc.report.table())
        raise
    click.echo(report.table())
    click.echo(f"wrote {output} ({report.bytes_after} bytes) in {report.seconds:.2f} s")
    if check_report is not None:
        click.echo("\ntrain-mode vs inference-mode check (onnxruntime, original model):")
        click.echo(check_report.table())
    if report_json:
        _write_json(report_json, {"fold_export": report, "check": check_report})
    if check_report is not None and not check_report.passed:
        raise BncalError("the exported model's moving statistics do not match its batch statistics "
                         "(see the check above); recalibrate it first: bncal recalibrate MODEL --data DATA -o OUT")


def _as_tuple(batch):
    if isinstance(batch, dict):
        return tuple(batch.values())
    return tuple(batch) if isinstance(batch, (list, tuple)) else (batch,)


def _as_feeds(batch, names):
    import numpy as np

    if isinstance(batch, dict):
        return {k: np.asarray(v) for k, v in batch.items()}
    values = batch if isinstance(batch, (list, tuple)) else (batch,)
    return {n: np.asarray(v) for n, v in zip(names, values)}


def _check_onnx_model(proto, data, max_samples):
    from .check import check_onnx

    return check_onnx(proto, data, max_samples=max_samples)


@main.command("check")
@click.argument("model")
@model_options
@data_options
@click.option("--max-mean-shift", type=float, default=0.1, show_default=True,
              help="Largest |moving mean - data mean| per channel, in data standard deviations.")
@click.option("--max-var-log-ratio", type=float, default=0.2, show_default=True,
              help="Largest |log(moving var / data var)| per channel.")
@click.option("--min-top1-agreement", type=float, default=0.8, show_default=True,
              help="Smallest fraction of samples whose arg-max agrees between inference and train mode.")
@click.option("--max-output-rel-error", type=float, default=0.5, show_default=True,
              help="Largest rms(inference - train) / rms(train) per output.")
@click.option("--plot", type=click.Path(dir_okay=False), help="Write a per-layer PNG of mean shift and variance ratio.")
@report_options
@handle_errors
def check(model, weights, model_kwargs, allow_pickle, data_spec, batch_size, max_samples, image_size, channels, norm_mean,
          norm_std, max_mean_shift, max_var_log_ratio, min_top1_agreement, max_output_rel_error, plot, report_json):
    """Check in onnxruntime that MODEL's moving statistics match the batch statistics of DATA.

    Per BN layer: mean shift and variance ratio of the moving statistics against the data's;
    per output: inference mode against train mode. Exit 1 when the statistics are stale.
    MODEL is an .onnx file or a factory spec (exported with its BatchNorms kept; the report
    then also shows PyTorch-eval vs onnxruntime parity). Use batches of 32 or more.
    """
    from itertools import islice

    from .check import CheckThresholds, check_onnx
    from .data import NumpyBatches, load_data
    from .loading import is_onnx_path

    if not data_spec:
        raise BncalError("--data is required: the data whose batch statistics the model is checked against")
    data = NumpyBatches(load_data(data_spec, batch_size=batch_size,
                                  image_options=_image_options(image_size, channels, norm_mean, norm_std)))
    thresholds = CheckThresholds(max_mean_shift=max_mean_shift, max_var_log_ratio=max_var_log_ratio,
                                 min_top1_agreement=min_top1_agreement, max_output_rel_error=max_output_rel_error)
    parity = None
    if is_onnx_path(model):
        from .onnx_io import load_onnx

        proto = load_onnx(model)
    else:
        import torch

        from .data import TorchBatches
        from .export import export_onnx
        from .fold_export import torch_onnx_parity
        from .loading import load_model

        net = load_model(model, weights=weights, model_kwargs=model_kwargs, allow_pickle=allow_pickle)
        dtype = next((p.dtype for p in net.parameters() if p.is_floating_point()), torch.float32)
        batches = [_as_tuple(b) for b in islice(TorchBatches(data, dtype), 3)]
        if not batches:
            raise BncalError("the calibration data is empty; give at least one batch")
        proto = export_onnx(net, batches[0], keep_batchnorm=True)
        parity = torch_onnx_parity(net, proto, batches)
    report = check_onnx(proto, data, thresholds=thresholds, max_samples=max_samples, progress=sys.stderr.isatty())
    if parity is not None:
        click.echo("PyTorch eval vs onnxruntime (exported graph):")
        click.echo(parity.table())
        click.echo("")
    click.echo(report.table())
    if report_json:
        _write_json(report_json, {"check": report, "parity": parity})
    if plot:
        from .plot import plot_check

        plot_check({"moving vs data": report}, plot)
    if not report.passed or (parity is not None and not parity.passed):
        sys.exit(1)


@main.command()
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="bncal-demo", show_default=True,
              help="Folder for the demo's files (recalibrated weights, folded ONNX model).")
@click.option("--models-dir", type=click.Path(file_okay=False, exists=True), help="The models/ folder (default: the checkout's).")
@click.option("--plot", type=click.Path(dir_okay=False), help="Write a per-layer PNG of the statistics before and after.")
@report_options
@handle_errors
def demo(out_dir, models_dir, plot, report_json):
    """Show on real data what bncal is for: a model with stale statistics, repaired and exported."""
    from .demo import run_demo

    result = run_demo(out_dir, models_dir=models_dir, plot=plot, echo=click.echo)
    if report_json:
        _write_json(report_json, result)
    if not (result.fold_export_passed and result.check_after_passed):
        raise BncalError("the demo did not end in a verified, consistent model; see the output above")


if __name__ == "__main__":  # pragma: no cover
    main()
