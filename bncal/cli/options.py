"""Option groups: each adds its options to a command and parses them into one value.

Polygraphy's pattern (``polygraphy/tools/args/``): a command lists the groups it uses
(``ModelArgs(), DataArgs(...), OutputArgs(...)``) and its body receives one namespace holding
each group's parsed value (``args.model``, ``args.data``, ``args.output``...), never twenty raw
parameters. A value that is itself wrong (a negative tolerance, an opset the exporter cannot
produce, a device this machine lacks, an output suffix) is a usage error (exit 2) raised while
parsing, before any work. Groups that name files also take part in the run's output plan
(:meth:`OptionGroup.plan`): inputs to protect, outputs to check up front.

Nothing here imports torch, onnx or onnxruntime at module level: ``--help`` stays fast.
"""

from __future__ import annotations

import json
import math
import re
import sys
import time
import types
from pathlib import Path

import click

from ..errors import BncalError

__all__ = [
    "OptionGroup", "Args", "command", "VerbosityArgs", "ModelArgs", "DataArgs", "InputShapeArgs", "ToleranceArgs",
    "ThresholdArgs", "DeviceArgs", "ProviderArgs", "OutputArgs", "ReportArgs", "RecalibrationArgs", "ExportArgs",
    "FoldArgs", "VerificationArgs", "TrainingArgs", "GateArgs", "GuardArgs", "Options", "Console", "InputShapes",
    "torch_batches", "random_inputs", "shaped_example",
]


# Parameter types: a wrong value fails while parsing, as a usage error naming the option. -----------------
class FiniteFloat(click.ParamType):
    """A finite number, at least ``min`` and at most ``max`` where given."""

    name = "number"

    def __init__(self, min: float | None = 0.0, max: float | None = None):
        self.min, self.max = min, max

    def convert(self, value, param, ctx):
        if isinstance(value, float):
            number = value
        else:
            try:
                number = float(value)
            except (TypeError, ValueError):
                self.fail(f"{value!r} is not a number", param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r}: give a finite number", param, ctx)
        if self.min is not None and number < self.min:
            self.fail(f"{value!r}: give a number of at least {self.min:g}", param, ctx)
        if self.max is not None and number > self.max:
            self.fail(f"{value!r}: give a number of at most {self.max:g}", param, ctx)
        return number


class ShapeType(click.ParamType):
    """``N,C,H,W`` (or ``NxCxHxW``): positive integers."""

    name = "shape"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        try:
            shape = tuple(int(v) for v in str(value).replace("x", ",").split(","))
        except ValueError:
            self.fail(f"{value!r}: give comma-separated integers such as 1,3,224,224", param, ctx)
        if not shape or any(d < 1 for d in shape):
            self.fail(f"{value!r}: every dimension must be a positive integer", param, ctx)
        return shape


class NamedShapesType(click.ParamType):
    """Polygraphy's ``name:[d0,d1,...]`` (several separated by spaces); the name is everything
    before the last colon (``input:0:[1,3]`` names ``input:0``)."""

    name = "name:shape"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        shapes = []
        for item in str(value).split():
            name, colon, dims = item.rpartition(":")
            if not colon or not name:
                self.fail(f"{item!r}: give NAME:[d0,d1,...] such as image:[1,3,224,224]", param, ctx)
            inner = re.fullmatch(r"\[([^][()]*)\]|\(([^][()]*)\)|([^][()]*)", dims)  # [..], (..) or bare
            if inner is None:
                self.fail(f"{item!r}: the brackets of {dims!r} do not match; give NAME:[d0,d1,...] such as "
                          f"{name}:[1,3,224,224]", param, ctx)
            shapes.append((name, ShapeType().convert(next(g for g in inner.groups() if g is not None), param, ctx)))
        if not shapes:
            self.fail("give NAME:[d0,d1,...] such as image:[1,3,224,224]", param, ctx)
        return tuple(shapes)


class CropType(click.ParamType):
    """``N`` (a square) or ``H,W`` / ``HxW``: positive integers."""

    name = "crop"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        try:
            size = tuple(int(v) for v in str(value).replace("x", ",").split(","))
        except ValueError:
            self.fail(f"{value!r}: give a size such as 224 or 224,192", param, ctx)
        if len(size) not in (1, 2) or any(v < 1 for v in size):
            self.fail(f"{value!r}: give one or two positive integers (H[,W])", param, ctx)
        return size * 2 if len(size) == 1 else size


class SelectorsType(click.ParamType):
    """Positions (``0``) or keys (``image``), comma-separated."""

    name = "inputs"

    def convert(self, value, param, ctx):
        from ..data import parse_selectors

        if isinstance(value, tuple):
            return value
        try:
            return parse_selectors(str(value))
        except BncalError as exc:
            self.fail(str(exc), param, ctx)


class FloatListType(click.ParamType):
    """``M`` or ``M,M,M``: finite numbers."""

    name = "numbers"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        try:
            numbers = tuple(float(v) for v in str(value).split(","))
        except ValueError:
            self.fail(f"{value!r}: give comma-separated numbers such as 0.485,0.456,0.406", param, ctx)
        if not all(math.isfinite(v) for v in numbers):
            self.fail(f"{value!r}: give finite numbers", param, ctx)
        return numbers


class JSONObjectType(click.ParamType):
    """A JSON object, such as ``{"width": 32}``."""

    name = "json"

    def convert(self, value, param, ctx):
        if isinstance(value, dict):
            return value
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError as exc:
            self.fail(f"not valid JSON ({exc.msg}); give an object such as '{{\"width\": 32}}'", param, ctx)
        if not isinstance(parsed, dict):
            self.fail("give a JSON object such as '{\"width\": 32}'", param, ctx)
        return parsed


class NamesType(click.ParamType):
    """Comma-separated names."""

    name = "names"

    def convert(self, value, param, ctx):
        if isinstance(value, list):
            return value
        names = [n.strip() for n in str(value).split(",") if n.strip()]
        if not names:
            self.fail("give one or more comma-separated names", param, ctx)
        return names


class OpsetType(click.ParamType):
    """An ONNX opset the installed exporter can produce (checked when given, not at --help)."""

    name = "opset"

    def convert(self, value, param, ctx):
        try:
            opset = int(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not an integer", param, ctx)
        from ..torch.export import supported_opsets

        opsets = supported_opsets()
        if opset not in opsets:
            self.fail(f"{opset}: the exporter here produces opsets {opsets.start} to {opsets.stop - 1}", param, ctx)
        return opset


class DeviceType(click.ParamType):
    """A torch device that this machine has."""

    name = "device"

    def convert(self, value, param, ctx):
        from ..distributed import parse_device

        try:
            return parse_device(str(value))
        except BncalError as exc:
            self.fail(str(exc), param, ctx)


def _usage_error(message: str, option: str | None = None):
    ctx = click.get_current_context(silent=True)
    if option:
        return click.BadParameter(message, ctx=ctx, param_hint=f"'{option}'")
    return click.UsageError(message, ctx=ctx)


# The console: what a command prints, respecting -q. ---------------------------------------------------
class Console:
    """Where a command's words go: reports to stdout (none with ``quiet``), warnings and errors to
    stderr. Lines that announce a written file wait until the run's outputs are in place.
    ``started`` is when the command line was parsed (:func:`time.perf_counter`), for the run's elapsed time."""

    def __init__(self, verbose: bool = False, quiet: bool = False, started: float | None = None):
        self.verbose, self.quiet = verbose, quiet
        self.started = time.perf_counter() if started is None else started
        self._after_commit: list[str] = []

    def elapsed(self) -> float:
        """Seconds since the command line was parsed: the whole run, loading and checks included."""
        return time.perf_counter() - self.started

    def verdict(self, line: str) -> None:
        """The run's one-line verdict (``PASSED``/``FAILED``/``INCOMPLETE: ...``, naming the worst item).
        The report on stdout already ends with it; with ``quiet``, which silences the report, it goes to
        stderr, so that ``-q`` still says how the run ended."""
        if self.quiet:
            click.echo(line, err=True)

    def echo(self, text: str = "") -> None:
        if not self.quiet:
            click.echo(text)

    def warn(self, text: str) -> None:
        click.echo(f"warning: {text}", err=True)

    def error(self, text: str) -> None:
        click.echo(f"error: {text}", err=True)

    def progress(self, text: str) -> None:
        """A step of a long command, on stderr, only when interactive (see :attr:`interactive`)."""
        if self.interactive:
            click.echo(f"{text}...", err=True)

    def finished(self) -> None:
        """The run's elapsed time on stderr, after its progress bars, when interactive."""
        if self.interactive:
            click.echo(f"finished in {self.elapsed():.1f} s", err=True)

    def echo_after_commit(self, text: str) -> None:
        """Print ``text`` once every output of the run is in place (never if the run fails)."""
        self._after_commit.append(text)

    def committed(self) -> None:
        for text in self._after_commit:
            self.echo(text)
        self._after_commit = []

    @property
    def interactive(self) -> bool:
        """Whether a progress bar makes sense (stderr is a terminal and output is wanted)."""
        return sys.stderr.isatty() and not self.quiet


# Groups. -------------------------------------------------------------------------------------------
class Args(types.SimpleNamespace):
    """What a command body receives: one attribute per option group (and ``plan``, the run's outputs)."""


class OptionGroup:
    """Adds options to a command (:meth:`params`) and parses their values into one value (:meth:`parse`).

    ``name`` is the attribute the value gets on :class:`Args`. Groups parse in the order a command
    lists them, so a group may use the values of the groups before it.
    """

    name: str = ""

    def params(self) -> list[click.Parameter]:
        raise NotImplementedError

    def parse(self, values: dict, args: Args):
        """The group's value on :class:`Args` (default: a namespace of its options by name)."""
        return types.SimpleNamespace(**values)

    def plan(self, value, plan, args: Args) -> None:
        """Register the inputs this group names and the outputs it asks for (default: none)."""


class Options(OptionGroup):
    """A command's own options, parsed into a namespace by their names."""

    def __init__(self, name: str, *params: click.Parameter):
        self.name, self._params = name, list(params)

    def params(self):
        return self._params


class VerbosityArgs(OptionGroup):
    """``-v``/``-q``, accepted before the subcommand (on ``bncal``) and after it (on every command)."""

    name = "ui"

    @staticmethod
    def options() -> list[click.Option]:
        return [
            click.Option(["-v", "--verbose"], is_flag=True, help="Show the traceback of an error."),
            click.Option(["-q", "--quiet"], is_flag=True,
                         help="Print no report on stdout; one verdict line, errors and warnings still go to stderr."),
        ]

    def params(self):
        return self.options()

    def parse(self, values, args):
        ctx = click.get_current_context(silent=True)
        root = ctx.find_root().meta if ctx is not None else {}
        return Console(verbose=values["verbose"] or root.get("bncal.verbose", False),
                       quiet=values["quiet"] or root.get("bncal.quiet", False), started=root.get("bncal.started"))


class ModelValue(types.SimpleNamespace):
    """The parsed model options. ``kind`` is decided once, from the spec (:func:`bncal.loading.model_kind`)."""

    def files(self) -> list[Path]:
        return self.kind.files(self.spec, self.weights)

    @property
    def display_name(self) -> str:
        """A short name for titles: the file's name, or the factory's with its weights file."""
        name = Path(self.spec.rpartition(":")[2] if ":" in self.spec else self.spec).name
        return f"{name} ({Path(self.weights).name})" if self.weights else name

    def load(self):
        """Load the model: a :class:`bncal.loading.LoadedModel` (``.kind``, ``.model``, ``.files``)."""
        from ..loading import load_any

        return load_any(self.spec, weights=self.weights, model_kwargs=self.model_kwargs, allow_pickle=self.allow_pickle,
                        strip_prefix=self.strip_prefix)


class ModelArgs(OptionGroup):
    """MODEL (an ``.onnx`` or ``.keras`` file, or a factory spec) with ``--weights``, ``--model-kwargs``,
    ``--allow-pickle``."""

    name = "model"

    def params(self):
        return [
            click.Argument(["model"], metavar="MODEL"),
            click.Option(["--weights"], type=click.Path(dir_okay=False),
                         help="Weights for a factory spec: .safetensors, or a .pt/.pth state dict (read with weights_only=True); "
                              "a .weights.h5 file for a factory returning a keras.Model."),
            click.Option(["--model-kwargs"], type=JSONObjectType(), metavar="JSON",
                         help="Keyword arguments for the model factory, as a JSON object."),
            click.Option(["--allow-pickle"], is_flag=True,
                         help="Allow loading files that execute code (pickled modules, pickled checkpoints, and the Lambda "
                              "layers of a .keras file: Keras's safe_mode=False). Only for files you trust."),
            click.Option(["--strip-prefix"], metavar="PREFIX",
                         help="Use the --weights keys under PREFIX (such as 'model.'), with PREFIX removed. Default: "
                              "'module.', 'model.' and '_orig_mod.' are removed where the result fits the model unambiguously."),
        ]

    def parse(self, values, args):
        from ..loading import model_kind

        return ModelValue(spec=values["model"], kind=model_kind(values["model"]), weights=values["weights"],
                          model_kwargs=values["model_kwargs"], allow_pickle=values["allow_pickle"],
                          strip_prefix=values["strip_prefix"])

    def plan(self, value, plan, args):
        plan.protect(value.files())


class DataValue(types.SimpleNamespace):
    """The parsed data options; :meth:`load` opens the data (this rank's shard under torchrun)."""

    def files(self) -> list[Path]:
        from ..specs import spec_files

        return spec_files(self.spec) if self.spec else []

    @property
    def is_image_folder(self) -> bool:
        """Whether the data is a folder of images (read as NCHW arrays, see :func:`bncal.data.load_data`)."""
        return bool(self.spec) and Path(self.spec).is_dir()

    def load(self, *, rank: int = 0, world_size: int = 1, batch_size: int | None = None):
        """The data; ``batch_size`` is the default where ``--batch-size`` was not given."""
        from ..data import load_data

        return load_data(self.spec, batch_size=self.batch_size or batch_size, rank=rank, world_size=world_size,
                         image_options=self.image_options, shuffle=self.shuffle, seed=self.seed, inputs=self.inputs,
                         normalize=self.normalize)

    def numpy_batches(self, *, rank: int = 0, world_size: int = 1, onnx_model=None):
        """The data as numpy batches; for an ``onnx_model`` whose inputs fix the batch size (a file
        exported with batch 1, say) that size is the default batch size."""
        from ..data import NumpyBatches

        fixed = None
        if onnx_model is not None:
            from ..onnx.runtime import fixed_batch_size, input_specs

            fixed = fixed_batch_size(input_specs(onnx_model))
        return NumpyBatches(self.load(rank=rank, world_size=world_size, batch_size=fixed))

    @staticmethod
    def notes(data) -> list[str]:
        """``["data: <what was read, in which order, in batches of which size>"]`` for a report's
        notes, or ``[]`` when ``data`` does not describe itself."""
        description = getattr(data, "description", None)
        return [f"data: {description}"] if description else []


_IMAGE_OPTIONS = ("image_size", "resize", "crop", "channels", "preset", "norm_mean", "norm_std")
_OPTION_NAMES = {"image_size": "--image-size", "resize": "--resize", "crop": "--crop", "channels": "--channels",
                 "preset": "--preset", "norm_mean": "--mean", "norm_std": "--std"}


class DataArgs(OptionGroup):
    """``--data`` and how it is read: which inputs, batch size, order, sample limit, image decoding."""

    name = "data"

    def __init__(self, *, required: str | None = None, batch_help: str = "Batch size for the pass over --data."):
        self.required, self.batch_help = required, batch_help

    def params(self):
        from_files = "(.npy/.npz/image folders)"
        return [
            click.Option(["--data", "data_spec"], metavar="DATA",
                         help="Data: .npy, .npz (arrays by input name), an image folder (class subfolders allowed), or "
                              "file.py:func / module:func returning batches."),
            click.Option(["--inputs"], multiple=True, type=SelectorsType(), metavar="POS|KEY",
                         help="The model inputs in each batch: a position (--inputs 0 for (inputs, labels) batches) or "
                              "a key / .npz array name (--inputs images); repeat or comma-separate for several."),
            click.Option(["--batch-size"], type=click.IntRange(min=1), default=None,
                         help=f"{self.batch_help} File data {from_files}: default 32. A data function gets it "
                              "(batch_size=) only when given; otherwise its own batching is used."),
            click.Option(["--max-samples"], type=click.IntRange(min=1), help="Use at most this many samples of --data."),
            click.Option(["--shuffle/--no-shuffle"], default=True, show_default=True,
                         help=f"Read file data {from_files} in an order shuffled with --seed; --no-shuffle keeps file "
                              "order. A data function's order is its own."),
            click.Option(["--seed"], type=click.IntRange(min=0), default=0, show_default=True,
                         help="Seed of the shuffled order of file data."),
            click.Option(["--normalize"], is_flag=True,
                         help="Treat uint8/uint16 arrays of .npy/.npz data as image pixels: scale to [0, 1], then "
                              "--mean/--std or --preset, as for image folders."),
            click.Option(["--image-size"], nargs=2, type=click.IntRange(min=1), metavar="H W",
                         help="Resize images to exactly H x W (image folders)."),
            click.Option(["--resize"], type=click.IntRange(min=1), metavar="N",
                         help="Resize images so that the shorter side is N pixels, keeping the aspect (image folders)."),
            click.Option(["--crop"], type=CropType(), metavar="H[,W]",
                         help="Center-crop images to H x W after resizing (image folders)."),
            click.Option(["--channels"], type=click.Choice(["1", "3"]), default=None,
                         help="Image channels: 1 grayscale, 3 RGB (image folders; default 3)."),
            click.Option(["--preset"], metavar="NAME",
                         help="Normalisation preset instead of --mean/--std: imagenet (mean 0.485,0.456,0.406, std "
                              "0.229,0.224,0.225) or mnist (0.1307, 0.3081)."),
            click.Option(["--mean", "norm_mean"], type=FloatListType(), metavar="M[,M,M]",
                         help="Per-channel mean after scaling pixels to [0, 1] (default 0)."),
            click.Option(["--std", "norm_std"], type=FloatListType(), metavar="S[,S,S]",
                         help="Per-channel standard deviation after scaling pixels to [0, 1] (default 1)."),
        ]

    def parse(self, values, args):
        from ..data import ImageOptions

        spec = values["data_spec"]
        if self.required and not spec:
            raise _usage_error(f"--data is required: {self.required}")
        given = [_OPTION_NAMES[k] for k in _IMAGE_OPTIONS if values[k] not in (None, ())]
        if spec and given and not Path(spec).is_dir():
            pixel_options = {"--preset", "--mean", "--std"}
            arrays = Path(spec).suffix.lower() in (".npy", ".npz")
            if not (arrays and values["normalize"] and set(given) <= pixel_options):
                where = ("image folders, and --mean/--std/--preset to .npy/.npz pixels with --normalize" if arrays
                         else "image folders")
                raise _usage_error(f"{', '.join(given)} appl{'ies' if len(given) == 1 else 'y'} to {where}; "
                                   f"--data {spec} is not one")
        try:
            image_options = ImageOptions(size=tuple(values["image_size"]) if values["image_size"] else None,
                                         channels=int(values["channels"] or 3), mean=values["norm_mean"],
                                         std=values["norm_std"], resize=values["resize"], crop=values["crop"],
                                         preset=values["preset"])
        except BncalError as exc:
            raise _usage_error(str(exc)) from None
        inputs = tuple(s for group in values["inputs"] for s in group) or None
        return DataValue(spec=spec, batch_size=values["batch_size"], max_samples=values["max_samples"],
                         image_options=image_options, shuffle=values["shuffle"], seed=values["seed"], inputs=inputs,
                         normalize=values["normalize"])

    def plan(self, value, plan, args):
        plan.protect(value.files())


class InputShapes(types.SimpleNamespace):
    """Shapes for seeded random inputs: ``positional`` (``--input-shape``, in input order) or
    ``named`` (``--input-shapes name:[...]``, by input name). False when neither is given."""

    def __bool__(self):
        return bool(self.positional or self.named)

    def ordered(self, names: list[str], *, prefix: bool = False) -> list[tuple[int, ...]]:
        """The shapes for inputs ``names`` in that order. With ``prefix`` (a PyTorch forward's
        parameters), named shapes may stop before the last parameter (the rest keep their
        defaults)."""
        if self.positional:
            if not prefix and len(self.positional) != len(names):
                raise BncalError(f"{len(self.positional)} --input-shape given for the model's {len(names)} inputs "
                                 f"{names}; give one per input, or name them: --input-shapes NAME:[d0,d1,...]")
            return list(self.positional)
        unknown = [n for n in self.named if n not in names]
        if unknown:
            raise BncalError(f"--input-shapes names {unknown}, which the model does not have; its inputs are {names}")
        wanted = names[:max(names.index(n) for n in self.named) + 1] if prefix else names
        missing = [n for n in wanted if n not in self.named]
        if missing:
            raise BncalError(f"--input-shapes gives no shape for the model's input{'s' if len(missing) > 1 else ''} "
                             f"{missing}; give one per input: --input-shapes {missing[0]}:[d0,d1,...]")
        return [self.named[n] for n in wanted]


class InputShapeArgs(OptionGroup):
    """``--input-shape`` (positional) or ``--input-shapes name:[...]`` (by name): shapes for seeded random inputs."""

    name = "shapes"

    def params(self):
        return [click.Option(["--input-shape", "input_shapes"], multiple=True, type=ShapeType(), metavar="N,C,H,W",
                             help="Shape of a model input for seeded random inputs (repeat for several inputs, in order)."),
                click.Option(["--input-shapes", "named_shapes"], multiple=True, type=NamedShapesType(),
                             metavar="NAME:[N,C,H,W]",
                             help="Shapes by input name, Polygraphy-style (several separated by spaces, or repeat): "
                                  "--input-shapes image:[2,3,32,32] meta:[2,4].")]

    def parse(self, values, args):
        named = {}
        for group in values["named_shapes"]:
            for name, shape in group:
                if name in named:
                    raise _usage_error(f"--input-shapes gives {name} twice")
                named[name] = shape
        if named and values["input_shapes"]:
            raise _usage_error("give --input-shape (in input order) or --input-shapes (by name), not both")
        return InputShapes(positional=list(values["input_shapes"]), named=named)


def shaped_example(shapes: InputShapes, net) -> tuple:
    """Seeded random inputs of a PyTorch ``net`` from ``--input-shape``/``--input-shapes``, run once:
    a model that fails on them gets an error naming the option (and, for a channel count that does
    not fit, the shape to give), not the model's own words alone."""
    import re

    import torch

    from ..errors import first_line
    from ..torch.export import forward_parameter_names

    ordered = shapes.ordered(forward_parameter_names(net) or [], prefix=True)
    example = random_inputs(ordered)
    modes = {module: module.training for module in net.modules()}
    try:
        net.eval()  # a train-mode forward would move the running statistics this run inspects or folds
        with torch.no_grad():
            net(*example)
    except Exception as exc:  # noqa: BLE001 - the model's own error, worded for the option that made its inputs
        option = "--input-shape" if shapes.positional else "--input-shapes"
        given = " ".join(",".join(map(str, shape)) for shape in ordered)
        message = first_line(exc)
        hint = ""
        channels = re.search(r"to have (\d+) channels, but got (\d+) channels", message)
        if channels and len(ordered) == 1 and len(ordered[0]) > 1:
            fixed = list(ordered[0])
            fixed[1] = int(channels.group(1))
            count = channels.group(1)
            hint = f"; the model expects {count} channel{'' if count == '1' else 's'}: give {option} {','.join(map(str, fixed))}"
        raise BncalError(f"{option} {given}: the model fails on inputs of this shape ({message}){hint}") from exc
    finally:
        for module, training in modes.items():
            module.training = training
    return example


def random_inputs(shapes, seed: int = 0) -> tuple:
    """Seeded standard-normal tensors of ``shapes`` (example inputs for tracing and export)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(shape, generator=generator) for shape in shapes)


def torch_batches(batches, net):
    """``batches`` as torch tensors, floating ones in the dtype of ``net``'s parameters."""
    import torch

    from ..data import TorchBatches

    dtype = next((p.dtype for p in net.parameters() if p.is_floating_point()), torch.float32)
    return TorchBatches(batches, dtype)


class ToleranceArgs(OptionGroup):
    """``--scale-tol``/``--atol``/``--rtol``: the output comparison's tolerance (:class:`bncal.verify.Tolerance`),
    ``|a - r| <= atol + rtol * |r| + scale_tol * max|r|``; none given: ``--scale-tol 1e-4``."""

    name = "tolerance"

    def params(self):
        return [
            click.Option(["--scale-tol"], type=FiniteFloat(0), default=None,
                         help="Largest error relative to each output's scale (max |reference|); the default rule, "
                              "1e-4, when no tolerance is given."),
            click.Option(["--atol"], type=FiniteFloat(0), default=None,
                         help="Absolute tolerance per element (adds to the terms given; finite, >= 0)."),
            click.Option(["--rtol"], type=FiniteFloat(0), default=None,
                         help="Relative tolerance per element, times |reference| (adds to the terms given; finite, >= 0)."),
        ]

    def parse(self, values, args):
        return types.SimpleNamespace(atol=values["atol"], rtol=values["rtol"], scale_tol=values["scale_tol"])

    @staticmethod
    def keywords(value) -> dict:
        """The tolerance as keyword arguments of :func:`bncal.verify.compare_outputs` and fold-export."""
        return dict(atol=value.atol, rtol=value.rtol, scale_tol=value.scale_tol)


class ThresholdArgs(OptionGroup):
    """The limits of ``bncal check`` (:class:`bncal.checking.CheckThresholds`), as keyword arguments."""

    name = "thresholds"

    def params(self):
        return [
            click.Option(["--max-mean-shift"], type=FiniteFloat(0), default=0.1, show_default=True,
                         help="Largest |moving mean - data mean| per channel, in data standard deviations."),
            click.Option(["--max-var-log-ratio"], type=FiniteFloat(0), default=0.2, show_default=True,
                         help="Largest |log(moving var / data var)| per channel."),
            click.Option(["--max-spread-ratio"], type=FiniteFloat(0), default=1.5, show_default=True,
                         help="Largest rms(inference - train) / rms(train - train on re-paired batches) per output: "
                              "how far beyond what batch statistics alone explain."),
            click.Option(["--min-top1-agreement"], type=FiniteFloat(0, 1), default=None,
                         help="Also require this fraction of samples whose arg-max agrees between inference and train mode."),
            click.Option(["--max-output-rel-error"], type=FiniteFloat(0), default=None,
                         help="Also require rms(inference - train) / rms(train) per output at most this."),
        ]

    def parse(self, values, args):
        return dict(values)


class DeviceArgs(OptionGroup):
    """``--device``, checked against this machine while parsing."""

    name = "device"

    def params(self):
        return [click.Option(["--device"], type=DeviceType(), default=None,
                             help="Device for the PyTorch pass (cpu, cuda, cuda:1, mps); default: cuda:LOCAL_RANK under "
                                  "torchrun with CUDA, else where the model is (cpu).")]

    def parse(self, values, args):
        return values["device"]


class ProviderValue(types.SimpleNamespace):
    """The parsed ``--providers``: ``names`` as onnxruntime spells them, or None for the default."""

    def resolve(self, local_rank: int | None = None) -> list:
        """The providers to run on: those given, else every one onnxruntime offers (CPU last).
        With ``local_rank`` (a torchrun launch), GPU providers run on that rank's device."""
        from ..onnx.runtime import available_providers, providers_on_device

        providers = self.names if self.names is not None else available_providers()
        return providers if local_rank is None else providers_on_device(providers, local_rank)


class ProviderArgs(OptionGroup):
    """``--providers``: the onnxruntime execution providers of the ONNX passes (checked when given).

    ``torch_models`` says whether the command runs a PyTorch model in onnxruntime too (check
    exports it); where it does not (recalibrate), ``--providers`` with a PyTorch model is a
    usage error.
    """

    name = "providers"

    def __init__(self, *, torch_models: bool = True):
        self.torch_models = torch_models

    def params(self):
        return [click.Option(["--providers"], type=NamesType(), metavar="NAMES",
                             help="onnxruntime execution providers in order of preference, comma-separated "
                                  "(cuda, tensorrt, openvino, dml, cpu, or full names); CPU is always added last. "
                                  "Default: every provider this onnxruntime offers.")]

    def parse(self, values, args):
        names = values["providers"]
        if names is None:
            return ProviderValue(names=None)
        model = getattr(args, "model", None)
        if not self.torch_models and model is not None and model.kind.name != "onnx":
            raise _usage_error("--providers applies to .onnx models, which run in onnxruntime; "
                               "a PyTorch model runs on --device", "--providers")
        from ..onnx.runtime import resolve_providers

        try:
            return ProviderValue(names=resolve_providers(names))
        except BncalError as exc:
            raise _usage_error(str(exc), "--providers") from None


class OutputArgs(OptionGroup):
    """``-o/--output`` (when the command has a main output) and ``--force``.

    ``suffixes(args)`` returns the suffixes ``-o`` may have and a hint for a wrong one.
    """

    name = "output"

    def __init__(self, help: str | None = None, suffixes=None):
        self.help, self.suffixes = help, suffixes

    def params(self):
        params = []
        if self.help:
            params.append(click.Option(["-o", "--output"], required=True, type=click.Path(dir_okay=False), help=self.help))
        params.append(click.Option(["--force"], is_flag=True, help="Replace existing output files."))
        return params

    def parse(self, values, args):
        path = Path(values["output"]) if values.get("output") else None
        if path is not None and self.suffixes is not None:
            allowed, hint = self.suffixes(args)
            if path.suffix.lower() not in allowed:
                raise _usage_error(f"{path} does not end in {' or '.join(allowed)}; {hint}", "-o")
        return types.SimpleNamespace(path=path, force=values["force"])

    def plan(self, value, plan, args):
        if value.path is not None:
            plan.add(value.path, "-o")


class ReportArgs(OptionGroup):
    """``--report-json`` and (where a command draws one) ``--plot``."""

    name = "report"

    def __init__(self, *, plot: str | None = None):
        self.plot_help = plot

    def params(self):
        params = [click.Option(["--report-json"], type=click.Path(dir_okay=False), help="Also write the report as JSON to this .json path.")]
        if self.plot_help:
            params.append(click.Option(["--plot"], type=click.Path(dir_okay=False), help=self.plot_help))
        return params

    def parse(self, values, args):
        json_path = Path(values["report_json"]) if values["report_json"] else None
        plot = Path(values["plot"]) if values.get("plot") else None
        if json_path is not None and json_path.suffix.lower() != ".json":
            raise _usage_error(f"{json_path} does not end in .json; give a path such as report.json", "--report-json")
        if plot is not None and plot.suffix.lower() != ".png":
            raise _usage_error(f"{plot} does not end in .png; the plot is a PNG image", "--plot")
        return types.SimpleNamespace(json=json_path, plot=plot)

    def plan(self, value, plan, args):
        if value.json is not None:
            plan.add(value.json, "--report-json")
        if value.plot is not None:
            from ..plot import require_matplotlib

            require_matplotlib()
            plan.add(value.plot, "--plot")

    @staticmethod
    def write_json(path, value) -> None:
        """Write ``value`` as the report JSON (:func:`bncal.report.report_json`): its fields, the bncal
        version, the schema version, the command and its command line."""
        from ..outputs import write_text
        from ..report import report_json

        ctx = click.get_current_context(silent=True)
        command = ctx.info_name if ctx is not None else None
        argv = ctx.meta.get("bncal.argv") if ctx is not None else None
        write_text(path, json.dumps(report_json(value, command=command, argv=argv), indent=2) + "\n")


class RecalibrationArgs(OptionGroup):
    """``--mode``, ``--prior``, ``--tol``, ``--max-passes``, ``--cache-mb``, ``--spill-dir`` of recalibration."""

    name = "recalibration"

    def params(self):
        return [
            click.Option(["--mode"], type=click.Choice(["train", "eval"]), default="train", show_default=True,
                         help="train: BN uses batch statistics during the pass (PreciseBN). eval: inference-consistent fixed point."),
            click.Option(["--prior"], type=FiniteFloat(0), default=0, show_default=True,
                         help="Adapting to a new domain from few samples: mix the model's current statistics in with weight N/(N+n), n the calibration samples (0: the data's statistics alone)."),
            click.Option(["--tol"], type=FiniteFloat(0), default=1e-5, show_default=True,
                         help="eval mode: stop when statistics change less than this (relative; finite, >= 0)."),
            click.Option(["--max-passes"], type=click.IntRange(min=1), default=None,
                         help="eval mode: at most this many passes over the data (default: number of BN layers + 1, where the result is exact)."),
            click.Option(["--cache-mb"], type=FiniteFloat(0), default=1024, show_default=True,
                         help="eval mode: memory (MiB, on the model's device) for the activations the exact depth-by-depth sweep keeps between depths."),
            click.Option(["--spill-dir"], type=click.Path(file_okay=False, exists=True),
                         help="eval mode: a folder where the sweep may spill activations beyond --cache-mb (its files are removed afterwards)."),
        ]


class ExportArgs(OptionGroup):
    """How a PyTorch model is exported: opset, names, batch axis."""

    name = "export"

    def params(self):
        return [
            click.Option(["--opset"], type=OpsetType(),
                         help="ONNX opset for the export (default: the exporter's); an opset the exporter cannot produce is refused."),
            click.Option(["--input-names"], type=NamesType(), help="Comma-separated graph input names."),
            click.Option(["--output-names"], type=NamesType(), help="Comma-separated graph output names."),
            click.Option(["--static-batch"], is_flag=True, help="Export a fixed batch size instead of a dynamic batch axis."),
        ]


class FoldArgs(OptionGroup):
    """What the graph fold may do beyond folding."""

    name = "fold"

    def params(self):
        return [
            click.Option(["--bn-to-affine"], is_flag=True, help="Turn BNs that cannot be folded into Mul + Add."),
            click.Option(["--constant-initializer-inputs"], is_flag=True,
                         help="ONNX input: fold parameters that are also graph inputs (IR < 4 files), treating them as constants."),
        ]


class RuleType(click.ParamType):
    """A rule id of ``bncal inspect`` (BN001...)."""

    name = "rule"

    def convert(self, value, param, ctx):
        from ..gate import allowed_rules

        try:
            return next(iter(allowed_rules(value)))
        except (BncalError, StopIteration) as exc:
            self.fail(str(exc) or f"{value!r}: give a rule id such as BN001", param, ctx)


class GateArgs(OptionGroup):
    """``--allow RULE``: error findings of ``bncal inspect`` accepted in a model the command writes
    (:func:`bncal.gate.require_healthy`); ``repairs`` says what the command itself repairs."""

    name = "gate"

    def __init__(self, *, repairs: str = ""):
        self.repairs = repairs

    def params(self):
        return [click.Option(["--allow"], multiple=True, type=RuleType(), metavar="RULE",
                             help="Write the model although bncal inspect finds this error in it (repeatable: "
                                  f"--allow BN001 --allow BN002). Without it a model with an error finding is "
                                  f"refused (exit 1, nothing written){self.repairs}.")]

    def parse(self, values, args):
        return types.SimpleNamespace(allow=tuple(values["allow"]))


class GuardValue(types.SimpleNamespace):
    """The parsed guard options: ``spec``, ``metric``, ``tol``; :meth:`batches` reads the data."""

    def batches(self, data):
        """The guard data as ``(inputs, labels)`` batches, read with the image options, ``--normalize``
        and batch size of ``data`` (the command's DataValue); None without ``--guard``."""
        if not self.spec:
            return None
        from ..guard import guard_batches

        return guard_batches(self.spec, batch_size=data.batch_size, image_options=data.image_options,
                             normalize=data.normalize)


class GuardArgs(OptionGroup):
    """``--guard DATA``, ``--metric``, ``--guard-tol``: the accuracy guard (:mod:`bncal.guard`)."""

    name = "guard"

    def __init__(self, *, scored: str):
        self.scored = scored

    def params(self):
        return [
            click.Option(["--guard", "guard_spec"], metavar="DATA",
                         help="Held-out labelled data: .npz with a 'labels' array, an image folder with one subfolder "
                              "per class, or file.py:function returning (inputs, labels) batches. The metric of "
                              f"{self.scored} must not be worse than that of the model as given (or of the model "
                              "normalising with each guard batch's own statistics, if better) by more than "
                              "--guard-tol; else nothing is written (exit 1). Image options as for --data."),
            click.Option(["--metric"], metavar="FILE.py:FUNCTION",
                         help="The guard's metric, metric(outputs, labels) -> float in [0, 1], higher is better "
                              "(default: top-1 accuracy of the first output)."),
            click.Option(["--guard-tol"], type=FiniteFloat(0), default=0.5, show_default=True,
                         help="Largest drop of the guard's metric allowed, in percentage points."),
        ]

    def parse(self, values, args):
        if not values["guard_spec"] and values["metric"]:
            raise _usage_error("--metric is the accuracy guard's metric: give --guard DATA too", "--metric")
        return GuardValue(spec=values["guard_spec"], metric=values["metric"], tol=values["guard_tol"])

    def plan(self, value, plan, args):
        from ..specs import spec_files

        for spec in (value.spec, value.metric):
            if spec:
                plan.protect(spec_files(spec))


class BatchListType(click.ParamType):
    """``B`` or ``B,B,...``: positive batch sizes."""

    name = "batches"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        try:
            sizes = tuple(int(v) for v in str(value).split(","))
        except ValueError:
            self.fail(f"{value!r}: give comma-separated batch sizes such as 1,32", param, ctx)
        if not sizes or any(b < 1 for b in sizes):
            self.fail(f"{value!r}: every batch size must be a positive integer", param, ctx)
        return sizes


class VerificationArgs(OptionGroup):
    """How fold-export proves its output: batches, the train/inference check, ``--keep-failed``, ``--latency``."""

    name = "verification"

    def params(self):
        return [
            click.Option(["--verify-batches"], type=click.IntRange(min=1), default=3, show_default=True,
                         help="Batches of --data to verify on."),
            click.Option(["--keep-failed"], is_flag=True,
                         help="If verification fails, keep the model as <stem>.FAILED-VERIFICATION.onnx (then exit 1)."),
            click.Option(["--check/--no-check", "run_check"], default=True, show_default=True,
                         help="With --data: also check train-mode vs inference-mode agreement in onnxruntime."),
            click.Option(["--latency"], type=BatchListType(), is_flag=False, flag_value="1,32", default=None,
                         metavar="[B,...]",
                         help="After verification, time both models in onnxruntime at these batch sizes "
                              "(alone: 1,32; a size a fixed-batch model cannot take is skipped)."),
        ]

    def plan(self, value, plan, args):
        if value.keep_failed:
            from ..folding.export import failed_output_path

            plan.add(failed_output_path(args.output.path), "--keep-failed", keep_on_failure=True)


class TrainingArgs(OptionGroup):
    """How the model is trained, for inspect's momentum and batch-size rules."""

    name = "training"

    def params(self):
        return [
            click.Option(["--train-batch-size"], type=click.IntRange(min=1),
                         help="Training batch size per device (momentum and batch renormalisation rules)."),
            click.Option(["--batch-size", "deprecated_batch_size"], type=click.IntRange(min=1), hidden=True,
                         help="Deprecated name of --train-batch-size."),
            click.Option(["--dataset-size"], type=click.IntRange(min=1), help="Training samples per epoch (momentum rule)."),
            click.Option(["--epochs"], type=click.FloatRange(min=0, min_open=True), default=1, show_default=True,
                         help="Training epochs (momentum rule)."),
        ]

    def parse(self, values, args):
        batch = values["train_batch_size"]
        old = values["deprecated_batch_size"]
        if old is not None:
            if batch is not None and batch != old:
                raise _usage_error(f"--batch-size {old} and --train-batch-size {batch} disagree; give --train-batch-size only")
            click.echo("warning: inspect --batch-size is deprecated; use --train-batch-size", err=True)
            batch = old
        return types.SimpleNamespace(batch_size=batch, dataset_size=values["dataset_size"], epochs=values["epochs"])


# Commands. -----------------------------------------------------------------------------------------
def command(name: str, *groups: OptionGroup):
    """Make a click command of ``groups``; the decorated body gets an :class:`Args` and returns an exit status.

    The body runs inside the run's output plan (every group's :meth:`OptionGroup.plan`, checked
    before the body starts) and under the CLI's error handling (:func:`bncal.cli.runner.run_command`).
    """
    def decorate(body):
        by_group = [(group, group.params()) for group in groups]

        def callback(**values):
            from .runner import run_command

            args = Args()
            for group, params in by_group:
                own = {p.name: values.pop(p.name) for p in params}
                setattr(args, group.name, group.parse(own, args))
            return run_command(body, args, groups)

        params = [p for _, ps in by_group for p in ps]
        doc = (body.__doc__ or "").strip()
        return click.Command(name, callback=callback, params=params, help=doc,
                             short_help=doc.splitlines()[0] if doc else None,
                             context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
    return decorate
