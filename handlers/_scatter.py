"""Scatter: cut one micro-batch's model output into one output per request, by its structure.

The rule (the default ``split`` of every handler):

- a tensor or a numpy array is batched along its first dimension: item ``i`` gets ``leaf[i]``;
- a tuple, named tuple, dict or dataclass is a structure: each field is cut by this same rule and
  item ``i`` gets the same structure holding its parts (nesting works the same way);
- a list holds one entry per item, as detection models return (``[{"boxes": …}, …]``);
- anything else (a number, a string, None, a 0-d tensor) cannot be attributed to one request.

Every tensor's first dimension and every list's length must equal the micro-batch size; if one
does not, nothing is cut and :class:`SplitFailed` names the path and the shapes seen. An output
cut by this rule can never hand one request another request's data.
"""

from __future__ import annotations

import dataclasses
from collections import abc
from typing import Any, Callable

from ._errors import SplitFailed

HOW_TO_FIX = "override split(output, count) to cut this output into one part per request"


def split_output(output: Any, count: int, to_host: Callable[[Any], Any] = lambda leaf: leaf) -> list:
    """``output`` of a micro-batch of ``count`` → ``count`` outputs, by the rule above.

    ``to_host`` is applied once to each tensor leaf before it is cut (e.g. a copy to the CPU).

    >>> import numpy as np
    >>> split_output({"scores": np.array([0.9, 0.2]), "boxes": [["a"], ["b", "c"]]}, 2)
    [{'scores': np.float64(0.9), 'boxes': ['a']}, {'scores': np.float64(0.2), 'boxes': ['b', 'c']}]

    Raises:
        SplitFailed: the output breaks the rule; nothing is cut.
    """
    problems: list = []
    _check(output, count, "output", problems)
    if problems:
        shapes = "; ".join(describe_leaves(output, "output"))
        raise SplitFailed(
            f"the model output of a micro-batch of {count} cannot be split per request: "
            f"{problems[0]}. Every tensor needs the micro-batch size as its first dimension and every "
            f"list one entry per item; seen: {shapes}. Reshape the output, or {HOW_TO_FIX}"
        )
    return _cut(output, count, to_host)


def _is_array(value: Any) -> bool:
    return hasattr(value, "shape") and hasattr(value, "__getitem__") and not isinstance(value, (str, bytes))


def _check(node: Any, count: int, path: str, problems: list) -> None:
    if _is_array(node):
        shape = tuple(node.shape)
        if not shape:
            problems.append(f"{path} is a 0-d {type(node).__name__} (a value for the whole micro-batch)")
        elif shape[0] != count:
            problems.append(f"{path} has shape {list(shape)}, first dimension {shape[0]} != {count}")
        return
    if isinstance(node, list):
        if len(node) != count:
            problems.append(f"{path} is a list of {len(node)} entries, not one per item ({count})")
        return
    children = _children(node)
    if children is None:
        problems.append(f"{path} is a {type(node).__name__}, which belongs to no single request")
        return
    if not children:
        problems.append(f"{path} is an empty {type(node).__name__}")
    for key, child in children:
        _check(child, count, _child_path(path, node, key), problems)


def _children(node: Any):
    """``[(key, child)]`` of a structure; None for a leaf that is not a structure."""
    if isinstance(node, abc.Mapping):
        return list(node.items())
    if isinstance(node, tuple):
        return list(enumerate(node))
    if dataclasses.is_dataclass(node) and not isinstance(node, type):
        return [(f.name, getattr(node, f.name)) for f in dataclasses.fields(node) if f.init]
    return None


def _child_path(path: str, node: Any, key: Any) -> str:
    if dataclasses.is_dataclass(node) or hasattr(type(node), "_fields"):
        name = key if isinstance(key, str) else type(node)._fields[key]
        return f"{path}.{name}"
    return f"{path}[{key!r}]"


def _cut(node: Any, count: int, to_host: Callable) -> list:
    if _is_array(node):
        node = to_host(node)
        unbind = getattr(node, "unbind", None)
        return list(unbind(0)) if unbind is not None else [node[i] for i in range(count)]
    if isinstance(node, list):
        return [_map_arrays(entry, to_host) for entry in node]
    if isinstance(node, abc.Mapping):
        columns = {key: _cut(child, count, to_host) for key, child in node.items()}
        return [_rebuild_mapping(node, {key: parts[i] for key, parts in columns.items()}) for i in range(count)]
    if isinstance(node, tuple):
        columns = [_cut(child, count, to_host) for child in node]
        return [_rebuild_tuple(node, [parts[i] for parts in columns]) for i in range(count)]
    fields = [(f.name, getattr(node, f.name)) for f in dataclasses.fields(node) if f.init]
    columns = {name: _cut(child, count, to_host) for name, child in fields}
    return [dataclasses.replace(node, **{name: parts[i] for name, parts in columns.items()}) for i in range(count)]


def _rebuild_mapping(node: abc.Mapping, values: dict) -> abc.Mapping:
    try:
        return type(node)(values)
    except TypeError:  # a mapping type that cannot be built from a dict
        return values


def _rebuild_tuple(node: tuple, values: list) -> tuple:
    if hasattr(type(node), "_fields"):  # a named tuple
        return type(node)(*values)
    try:
        return type(node)(values)  # tuple, and structseqs such as torch.return_types.sort
    except TypeError:
        return tuple(values)


def _map_arrays(node: Any, to_host: Callable) -> Any:
    """``to_host`` applied to every tensor inside one list entry (its structure kept)."""
    if _is_array(node):
        return to_host(node)
    if isinstance(node, list):
        return [_map_arrays(child, to_host) for child in node]
    if isinstance(node, abc.Mapping):
        return _rebuild_mapping(node, {key: _map_arrays(child, to_host) for key, child in node.items()})
    if isinstance(node, tuple):
        return _rebuild_tuple(node, [_map_arrays(child, to_host) for child in node])
    return node


def describe_leaves(node: Any, path: str, limit: int = 8) -> list:
    """``["output['boxes']: Tensor[2, 4]", ...]``: what each leaf of an output is."""
    found: list = []

    def visit(value, where):
        if len(found) >= limit:
            return
        if _is_array(value):
            found.append(f"{where}: {type(value).__name__}{list(value.shape)}")
        elif isinstance(value, list):
            found.append(f"{where}: list of {len(value)}")
        elif (children := _children(value)) is not None:
            for key, child in children:
                visit(child, _child_path(where, value, key))
        else:
            found.append(f"{where}: {type(value).__name__}")

    visit(node, path)
    return found
