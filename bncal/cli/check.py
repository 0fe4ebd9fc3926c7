"""``bncal check``: do the moving statistics match the data, in onnxruntime?"""

from __future__ import annotations

from itertools import islice

from ..errors import BncalError
from .options import (DataArgs, ModelArgs, OutputArgs, ProviderArgs, ReportArgs, ThresholdArgs, VerbosityArgs,
                      as_inputs, command, torch_batches)


@command(
    "check",
    ModelArgs(),
    DataArgs(required="the data whose batch statistics the model is checked against",
             batch_help="Batch size of the check (32 or more, shuffled)."),
    ThresholdArgs(),
    ProviderArgs(),
    OutputArgs(),
    ReportArgs(plot="Write a per-layer PNG of mean shift and variance ratio (needs the 'plot' extra)."),
    VerbosityArgs(),
)
def command(args) -> int:
    """Check in onnxruntime that MODEL's moving statistics match the batch statistics of DATA.

    Per BN layer: mean shift and variance ratio of the moving statistics against the data's;
    per output: inference mode against train mode. Exit 1 when the statistics are stale.
    MODEL is an .onnx file or a factory spec (exported with its BatchNorms kept; the report
    then also shows PyTorch-eval vs onnxruntime parity). Use batches of 32 or more.
    """
    from ..check import CheckThresholds, check_onnx

    ui = args.ui
    data = args.data.numpy_batches()
    thresholds = CheckThresholds(**args.thresholds)
    loaded = args.model.load()
    parity = None
    if loaded.kind == "onnx":
        proto = loaded.model
    else:
        from ..export import export_onnx
        from ..fold_export import torch_onnx_parity

        net = loaded.model
        batches = [as_inputs(b) for b in islice(torch_batches(data, net), 3)]
        if not batches:
            raise BncalError("the calibration data is empty; give at least one batch")
        proto = export_onnx(net, batches[0], keep_batchnorm=True)
        parity = torch_onnx_parity(net, proto, batches)
    report = check_onnx(proto, data, thresholds=thresholds, max_samples=args.data.max_samples,
                        providers=args.providers.resolve(), progress=ui.interactive)
    if parity is not None:
        ui.echo("PyTorch eval vs onnxruntime (exported graph):")
        ui.echo(parity.table())
        ui.echo("")
    ui.echo(report.table())
    # A completed check writes its report whatever the verdict: the report is what a failure is read from.
    if args.report.json:
        ReportArgs.write_json(args.report.json, {"check": report, "parity": parity})
    if args.report.plot:
        from ..plot import plot_check

        plot_check({"moving vs data": report}, args.report.plot, model=args.model.display_name)
    return 0 if report.passed and (parity is None or parity.passed) else 1
