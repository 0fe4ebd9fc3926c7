"""Names: the one rule for naming BatchNorm nodes in reports, and fresh names for new tensors.

Every command (recalibrate, check, fold-export, inspect) and every report format (tables,
JSON, plots) names an ONNX BatchNormalization node with :func:`batchnorm_names`, so the same
node has the same name everywhere:

- its node name when it has one;
- else its first output's name (an exporter's tensor names are often meaningful, and a
  user can find the tensor in Netron);
- a name already given to an earlier BN gets ``#2``, ``#3``, ... in graph order (ONNX does
  not require node names to be unique; report names must be);
- BNs inside subgraphs (If/Loop/Scan bodies) are prefixed ``<owner node name>/``.

PyTorch BNs are named by their module path (``layer1.0.bn1``); bncal's export names BN nodes
after their modules, so an exported model's BNs keep the PyTorch names.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["batchnorm_names", "onnx_batchnorm_names", "fresh_name", "subgraphs", "ONNX_DOMAINS"]

ONNX_DOMAINS = ("", "ai.onnx")  # the default operator set's two spellings


def batchnorm_names(nodes: Iterable[tuple[str | None, str | None]]) -> list[str]:
    """Report names for BN nodes given in graph order as ``(node name, first output name)``.

    Works for any graph representation (onnx protos, onnx_ir nodes) that can list its BNs in
    the order of the ONNX file.
    """
    names, taken = [], set()
    for index, (node_name, output_name) in enumerate(nodes):
        base = node_name or output_name or f"BatchNormalization_{index}"
        name, counter = base, 1
        while name in taken:
            counter += 1
            name = f"{base}#{counter}"
        taken.add(name)
        names.append(name)
    return names


def onnx_batchnorm_names(graph) -> dict[tuple[int, ...], str]:
    """Names of every BatchNormalization in an ``onnx.GraphProto`` or ``onnx_ir.Graph``, keyed by node path.

    A top-level node's key is ``(index,)``; a node in a subgraph is keyed by the path of
    indices through its owner nodes, e.g. ``(4, 0, 2)`` for node 2 of the first subgraph of
    node 4. Keys are in file order, top level first.
    """
    import onnx

    found: list[tuple[tuple[int, ...], str, str | None, str | None]] = []

    def visit(g, path, prefix):
        nodes = g.node if isinstance(g, onnx.GraphProto) else list(g)  # onnx_ir graphs iterate their nodes
        for index, node in enumerate(nodes):
            if node.op_type == "BatchNormalization" and node.domain in ONNX_DOMAINS:
                found.append((path + (index,), prefix, node.name or None, _first_output_name(node)))
        for index, node in enumerate(nodes):
            for k, sub in enumerate(subgraphs(node)):
                owner = node.name or node.op_type
                visit(sub, path + (index, k), f"{prefix}{owner}/")

    visit(graph, (), "")
    top = [f for f in found if f[1] == ""]
    nested = [f for f in found if f[1] != ""]
    ordered = top + nested
    labels = batchnorm_names((prefix + name if name else None, prefix + out if out else None)
                             for _, prefix, name, out in ordered)
    return {path: label for (path, _, _, _), label in zip(ordered, labels)}


def _first_output_name(node) -> str | None:
    outputs = node.outputs if hasattr(node, "outputs") else node.output
    if not outputs:
        return None
    first = outputs[0]
    return (first if isinstance(first, str) else first.name) or None


def subgraphs(node):
    """The graphs held in ``node``'s attributes (If branches, Loop and Scan bodies), for
    ``onnx.NodeProto`` and ``onnx_ir.Node`` alike."""
    import onnx

    if hasattr(node, "attributes"):  # onnx_ir
        import onnx_ir as ir

        for attr in node.attributes.values():
            if attr.type == ir.AttributeType.GRAPH:
                yield attr.value
            elif attr.type == ir.AttributeType.GRAPHS:
                yield from attr.value
        return
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.g
        elif attr.type == onnx.AttributeProto.GRAPHS:
            yield from attr.graphs


def fresh_name(base: str, taken: set[str], *, separator: str = ".") -> str:
    """``base``, or ``base<separator>2``, ``3``... : the first not in ``taken``, which it joins."""
    name, counter = base, 1
    while name in taken:
        counter += 1
        name = f"{base}{separator}{counter}"
    taken.add(name)
    return name
