"""The graph the fold rules read: ONNX vocabulary, one data flow, constants as numpy.

Both backends build one: :mod:`.onnx_backend` from an ONNX graph, :mod:`.torch_backend` from a
traced PyTorch model, presented the way the exporter would emit it (a Conv with
``padding_mode="reflect"`` is a ``Pad(mode=reflect)`` feeding a ``Conv`` without pads, an
``nn.Linear`` on a 2-D input is a ``Gemm(transB=1)``, Dropout is ``Identity``...). The rules in
:mod:`.rules` see the same structure either way, so they decide the same.

Normalised attributes the rules read (absent means the ONNX default):

- Conv/ConvTranspose: ``group``, ``pads``, ``auto_pad``. Gemm: ``alpha``, ``beta``, ``transA``,
  ``transB``. Transpose: ``perm`` (None if unknown). Cast: ``to`` (a numpy dtype name).
- Pad: ``mode`` (constant/reflect/edge/wrap), ``pads`` as ``{axis: (begin, end)}`` (None if not
  constant or the axes are unknown).
- Reshape (also Flatten): ``keeps_axis0`` when the op itself guarantees output axis 0 is input
  axis 0 (Flatten axis=1, Reshape to ``[0, -1]``); ``target`` the constant target shape if any.
- BatchNormalization: ``epsilon``, ``training_mode``, ``spatial``, ``training_outputs_used``.

Dims in ``shape`` are ints, symbol names (str; equal names are equal sizes) or None (unknown).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

__all__ = ["Param", "ModuleFacts", "Node", "Graph"]


@dataclasses.dataclass(eq=False)
class Param:
    """A constant input of a node: a weight, a bias, BN statistics."""

    name: str
    array: np.ndarray | None  # None: the input is not a constant (computed or fed at run time)
    dtype: str | None = None  # element type the folded value is written back in
    overridable: bool = False  # an initializer that is also a graph input (ONNX IR < 4)
    handle: Any = None  # the backend's own reference


@dataclasses.dataclass(eq=False)
class ModuleFacts:
    """What the PyTorch view knows about the module behind a node (the ONNX view has none).

    These are limits of changing modules in place, not of the math; the rules refuse with them.
    """

    type_name: str
    overrides_forward: bool = False
    hooks: bool = False
    calls: int = 1  # times forward runs the module
    parametrized: bool = False
    read_elsewhere: bool = False  # forward reads its parameters as attributes (tied weights)
    shared_weights: bool = False  # a parameter also belongs to another module
    extra_arguments: bool = False  # called with more than its one data input
    no_running_stats: bool = False  # a BN with track_running_stats=False


@dataclasses.dataclass(eq=False)
class Node:
    """One op. ``inputs[i]`` is the node producing input ``i`` (None for a constant or absent
    input; ``params[i]`` then holds the constant). Graph inputs are nodes of op ``Input``."""

    op: str
    name: str
    output: str  # name of the (first) output, for messages
    inputs: list[Node | None]
    params: dict[int, Param] = dataclasses.field(default_factory=dict)
    attrs: dict[str, Any] = dataclasses.field(default_factory=dict)
    shape: tuple | None = None
    dtype: str | None = None
    graph_output: bool = False
    module: ModuleFacts | None = None
    handle: Any = None
    users: list[tuple[Node, int]] = dataclasses.field(default_factory=list)
    changed: bool = False  # op, attributes or params rewritten by a fold

    def input_shape(self, index: int = 0) -> tuple | None:
        source = self.inputs[index] if index < len(self.inputs) else None
        return None if source is None else source.shape


@dataclasses.dataclass
class Graph:
    """Nodes in graph order and what the rules need to know about the whole graph."""

    nodes: list[Node]
    opset: int | None = None  # default-domain opset (None for a PyTorch model)
    old_ir: bool = False  # ONNX IR < 4: initializers are graph inputs

    def __post_init__(self):
        for node in self.nodes:
            for index, source in enumerate(node.inputs):
                if source is not None:
                    source.users.append((node, index))

    def batchnorms(self) -> list[Node]:
        return [n for n in self.nodes if n.op == "BatchNormalization"]

    def bypass(self, node: Node, data_index: int = 0) -> None:
        """Remove ``node``; its users read its data input instead (a graph output moves too)."""
        source = node.inputs[data_index]
        for user, index in node.users:
            user.inputs[index] = source
            if source is not None:
                source.users.append((user, index))
        for other in node.inputs:
            if other is not None:
                other.users = [(u, i) for u, i in other.users if u is not node]
        if source is not None:
            source.graph_output = source.graph_output or node.graph_output
        node.users = []
        self.nodes.remove(node)
