"""Scatter by evidence: which parts of a model's output carry the batch, and along which
dimension, is learned from the model before any output is cut; then each micro-batch's output
is cut into one output per request by that layout.

A single call proves nothing: a list of four batched heads and a batch of four look alike, and so
do a sequence-first ``(T, B, D)`` output with ``T == B`` and a batch-first one. The layout is
known from one of (first match wins, and a later one is checked against the earlier):

1. a **declaration**: ``handler.batch_dims`` maps an output path (as messages print it:
   ``output``, ``output[0]``, ``output['logits']``, ``output.hidden``) to the batch dimension
   of that tensor, ``"items"`` (a list with one entry per request) or ``"shared"`` (the same
   value for every request, copied to each);
2. **samples** run at start-up at several micro-batch sizes (:mod:`handlers.core.self_test`);
3. a **probe** on live traffic: the first time a micro-batch has no known layout, the model is
   called once more at another size (its first half; a lone request twice over), and the layout
   is learned from the two sizes (a third size when two leave it ambiguous). That layout is then
   reused for every later call whose output fits it.

Learning from calls at two or more sizes ``n``: a tensor dimension whose size is ``n`` in every
call carries the batch (exactly one such dimension, else the output is refused as ambiguous); a
list whose length is ``n`` in every call holds one entry per request, one whose length stays
fixed is a structure (heads, feature maps) cut entry by entry; tuples, dicts, named tuples and
dataclasses are structures. A part that does not follow the batch belongs to no single request
and is refused, unless declared ``"shared"``.

A lone request is probed too (with itself twice over), so that its answer has the same shape
alone as beside others.
"""

from __future__ import annotations

import copy
import dataclasses
import threading
from collections import abc
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

from handlers.engine.errors import SplitFailed

HOW_TO_FIX = ("declare it in the handler's settings, e.g. handler.batch_dims: {'output': 0} (a tensor's batch "
              "dimension, 'items' for a list with one entry per request, 'shared' for a value common to all), "
              "ship samples with the archive (samples: in the archiver config), or override split(output, count)")
ROOT = "output"
ITEMS = "items"
SHARED = "shared"


# -- layouts -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Batched:
    """A tensor or array whose dimension ``dim`` is the batch."""

    dim: int


@dataclass(frozen=True)
class Items:
    """A list with one entry per request."""


@dataclass(frozen=True)
class Shared:
    """The same value for every request (declared, and checked on samples where there are some)."""


@dataclass(frozen=True)
class Fields:
    """A structure: ``kind`` is mapping, tuple, dataclass or list (fixed length); each child has
    its own layout."""

    kind: str
    keys: tuple
    children: tuple


Layout = Any  # Batched | Items | Shared | Fields


class LayoutMismatch(SplitFailed):
    """An output does not fit the layout in use (its structure or a batched size changed)."""


class LayoutAmbiguous(SplitFailed):
    """Several dimensions followed the micro-batch size at every size seen: another size may tell."""


class LayoutUnknown(Exception):
    """No evidence yet for this output's layout: the caller probes the model at another size and
    hands both outputs to :meth:`learn`. Not an error a request ever sees."""

    def __init__(self, count: int, learn: Callable[[Mapping[int, Any]], None]):
        super().__init__(f"the batch layout of this output is unknown (micro-batch of {count})")
        self.count = count
        self.learn = learn


def is_array(value: Any) -> bool:
    return hasattr(value, "shape") and hasattr(value, "__getitem__") and not isinstance(value, (str, bytes))


def children_of(node: Any) -> Optional[tuple]:
    """``(kind, [(key, child)])`` of a structure (a list counts as one); None for a leaf."""
    if isinstance(node, list):
        return "list", list(enumerate(node))
    if isinstance(node, abc.Mapping):
        return "mapping", list(node.items())
    if isinstance(node, tuple):
        return "tuple", list(enumerate(node))
    if dataclasses.is_dataclass(node) and not isinstance(node, type):
        return "dataclass", [(f.name, getattr(node, f.name)) for f in dataclasses.fields(node) if f.init]
    return None


def child_path(path: str, node: Any, key: Any) -> str:
    if dataclasses.is_dataclass(node) or hasattr(type(node), "_fields"):
        name = key if isinstance(key, str) else type(node)._fields[key]
        return f"{path}.{name}"
    return f"{path}[{key!r}]"


def describe_leaves(node: Any, path: str = ROOT, limit: int = 8) -> list:
    """``["output['boxes']: Tensor[2, 4]", ...]``: what each leaf of an output is."""
    found: list = []

    def visit(value, where):
        if len(found) >= limit:
            return
        if is_array(value):
            found.append(f"{where}: {type(value).__name__}{list(value.shape)}")
        elif isinstance(value, list) and (not value or not all(_could_hold_batch(v) for v in value)):
            found.append(f"{where}: list of {len(value)}")
        elif (structure := children_of(value)) is not None:
            for key, child in structure[1]:
                visit(child, child_path(where, value, key))
        else:
            found.append(f"{where}: {type(value).__name__}")

    visit(node, path)
    return found


def _could_hold_batch(value: Any) -> bool:
    return is_array(value) or children_of(value) is not None


# -- learning ------------------------------------------------------------------------------------


def learn_layout(observations: Mapping[int, Any], declared: Mapping[str, Any] = {}) -> Layout:
    """The layout of an output from calls at two or more distinct micro-batch sizes
    (``{size: output}``), with ``declared`` parts taken as given (and checked).

    Raises:
        SplitFailed: the evidence is ambiguous or the output cannot be cut per request; the
            message names the path, the sizes seen and how to fix it.
    """
    sizes = sorted(observations)
    if len(sizes) < 2:
        raise ValueError("learning a batch layout needs outputs at two or more micro-batch sizes")
    return _learn([(n, observations[n]) for n in sizes], declared, ROOT)


def _learn(seen: list, declared: Mapping[str, Any], path: str) -> Layout:
    sizes = [n for n, _ in seen]
    nodes = [node for _, node in seen]
    wanted = declared.get(path)
    if wanted == SHARED:
        return Shared()
    if all(is_array(node) for node in nodes):
        return _learn_array(path, sizes, [tuple(node.shape) for node in nodes], wanted)
    structures = [children_of(node) for node in nodes]
    if all(s is not None for s in structures):
        kinds = {s[0] for s in structures}
        if len(kinds) > 1:
            _refuse(path, f"is a {' or a '.join(sorted(kinds))} depending on the micro-batch size ({_sizes(sizes)})")
        kind = kinds.pop()
        if kind == "list":
            lengths = [len(node) for node in nodes]
            if wanted == ITEMS or (wanted is None and lengths == sizes):
                if lengths != sizes:
                    _refuse(path, f"is declared 'items' but has {_counts(lengths)} entries at micro-batch sizes {_sizes(sizes)}")
                return Items()
            if len(set(lengths)) > 1:
                _refuse(path, f"is a list of {_counts(lengths)} entries at micro-batch sizes {_sizes(sizes)}: neither one "
                              f"entry per request nor a fixed number")
        if wanted is not None:
            _refuse(path, f"is a {kind}: declare the batch dimension of its parts, not of the {kind}")
        keys = [tuple(key for key, _ in s[1]) for s in structures]
        if len(set(keys)) > 1:
            _refuse(path, f"changes its fields with the micro-batch size ({_sizes(sizes)})")
        children = tuple(
            _learn([(n, s[1][i][1]) for n, s in zip(sizes, structures)], declared, child_path(path, nodes[0], key))
            for i, key in enumerate(keys[0])
        )
        if not children:
            _refuse(path, f"is an empty {kind}")
        return Fields(kind, keys[0], children)
    kinds = sorted({type(node).__name__ for node in nodes})
    if len(kinds) == 1 and all(not is_array(node) and children_of(node) is None for node in nodes):
        _refuse(path, f"is a {kinds[0]}, one value for the whole micro-batch: it belongs to no single request "
                      f"(declare it 'shared' if it is the same for every request)")
    _refuse(path, f"is a {' or a '.join(kinds)} depending on the micro-batch size ({_sizes(sizes)})")


def _learn_array(path: str, sizes: list, shapes: list, wanted: Any) -> Layout:
    ranks = {len(shape) for shape in shapes}
    if len(ranks) > 1:
        _refuse(path, f"changes its number of dimensions with the micro-batch size: {_shapes(shapes, sizes)}")
    rank = ranks.pop()
    following = [d for d in range(rank) if all(shape[d] == n for shape, n in zip(shapes, sizes))]
    if wanted is not None:
        if not isinstance(wanted, int) or isinstance(wanted, bool) or not -rank <= wanted < rank:
            _refuse(path, f"is declared with batch dimension {wanted!r}, but it is a tensor of {rank} dimensions")
        dim = wanted % rank
        if dim not in following:
            _refuse(path, f"is declared with batch dimension {wanted}, but its sizes there do not follow the "
                          f"micro-batch size: {_shapes(shapes, sizes)}")
        return Batched(dim)
    if len(following) == 1:
        return Batched(following[0])
    if len(following) > 1:
        _refuse(path, f"has the micro-batch size in dimensions {following} at every size tried "
                      f"({_shapes(shapes, sizes)}): which one is the batch is ambiguous (an output that pairs "
                      f"requests, such as a similarity matrix, cannot be split per request)", LayoutAmbiguous)
    _refuse(path, f"has no dimension that follows the micro-batch size ({_shapes(shapes, sizes)}): a value "
                  f"for the whole micro-batch belongs to no single request")


def declared_layout(output: Any, declared: Mapping[str, Any], path: str = ROOT) -> Optional[Layout]:
    """The layout of ``output`` from the declaration alone; None when a part is undeclared (a
    tensor, or a list that may be one entry per request or a structure)."""
    wanted = declared.get(path)
    if wanted == SHARED:
        return Shared()
    if wanted == ITEMS:
        return Items() if isinstance(output, list) else None
    if is_array(output):
        rank = len(output.shape)
        if isinstance(wanted, int) and not isinstance(wanted, bool) and -rank <= wanted < rank:
            return Batched(wanted % rank)
        return None
    structure = children_of(output)
    if structure is None or not structure[1]:
        return None
    kind, entries = structure
    children = []
    for key, child in entries:
        layout = declared_layout(child, declared, child_path(path, output, key))
        if layout is None:
            return None
        children.append(layout)
    return Fields(kind, tuple(key for key, _ in entries), tuple(children))


def may_hold_a_batch(output: Any, count: int) -> bool:
    """Whether any part of ``output`` could carry a micro-batch of ``count`` (a tensor with a
    dimension of that size, or a list): if not, no probe can make it splittable."""
    if is_array(output):
        return count in tuple(output.shape)
    structure = children_of(output)
    if structure is None:
        return False
    return structure[0] == "list" or any(may_hold_a_batch(child, count) for _, child in structure[1])


def _refuse(path: str, problem: str, error: type = SplitFailed) -> None:
    raise error(f"the model output cannot be split per request: {path} {problem}. To say how it is "
                f"batched, {HOW_TO_FIX}")


def _sizes(sizes: list) -> str:
    return ", ".join(str(n) for n in sizes)


def _counts(counts: list) -> str:
    return ", ".join(str(n) for n in counts)


def _shapes(shapes: list, sizes: list) -> str:
    return "; ".join(f"{list(shape)} at {n}" for shape, n in zip(shapes, sizes))


# -- cutting -------------------------------------------------------------------------------------


def cut(layout: Layout, output: Any, count: int, to_host: Callable[[Any], Any] = lambda leaf: leaf,
        path: str = ROOT) -> list:
    """``output`` of a micro-batch of ``count`` → ``count`` outputs, by ``layout``.

    Raises:
        LayoutMismatch: the output does not fit the layout; nothing was handed out.
    """
    if isinstance(layout, Batched):
        if not is_array(output) or len(output.shape) <= layout.dim or output.shape[layout.dim] != count:
            shape = list(output.shape) if is_array(output) else type(output).__name__
            raise LayoutMismatch(f"{path} is {shape}, not a tensor with {count} (the micro-batch size) in "
                                 f"dimension {layout.dim} as learned")
        leaf = to_host(output)
        unbind = getattr(leaf, "unbind", None)
        if unbind is not None:
            return list(unbind(layout.dim))
        index = (slice(None),) * layout.dim
        return [leaf[index + (i,)] for i in range(count)]
    if isinstance(layout, Items):
        if not isinstance(output, list) or len(output) != count:
            found = f"a list of {len(output)}" if isinstance(output, list) else type(output).__name__
            raise LayoutMismatch(f"{path} is {found}, not a list of one entry per request ({count})")
        return [map_arrays(entry, to_host) for entry in output]
    if isinstance(layout, Shared):
        value = map_arrays(output, to_host)
        # A copy each: postprocessing runs concurrently, and may change its part in place.
        return [value] + [copy.deepcopy(value) for _ in range(count - 1)]
    structure = children_of(output)
    if structure is None or structure[0] != layout.kind or tuple(k for k, _ in structure[1]) != layout.keys:
        raise LayoutMismatch(f"{path} is not the {layout.kind} of fields {list(layout.keys)} learned")
    columns = [cut(child_layout, child, count, to_host, child_path(path, output, key))
               for child_layout, (key, child) in zip(layout.children, structure[1])]
    return [rebuild(output, layout.kind, layout.keys, [column[i] for column in columns]) for i in range(count)]


def rebuild(node: Any, kind: str, keys: tuple, values: list) -> Any:
    """A structure like ``node`` holding ``values``."""
    if kind == "list":
        return list(values)
    if kind == "mapping":
        try:
            return type(node)(zip(keys, values))
        except TypeError:  # a mapping type that cannot be built from pairs
            return dict(zip(keys, values))
    if kind == "tuple":
        if hasattr(type(node), "_fields"):  # a named tuple
            return type(node)(*values)
        try:
            return type(node)(values)  # tuple, and structseqs such as torch.return_types.sort
        except TypeError:
            return tuple(values)
    return dataclasses.replace(node, **dict(zip(keys, values)))


def map_arrays(node: Any, to_host: Callable) -> Any:
    """``to_host`` applied to every tensor inside ``node`` (its structure kept)."""
    if is_array(node):
        return to_host(node)
    structure = children_of(node)
    if structure is None:
        return node
    kind, entries = structure
    return rebuild(node, kind, tuple(k for k, _ in entries), [map_arrays(child, to_host) for _, child in entries])


# -- the default split ---------------------------------------------------------------------------


class Scatter:
    """The default ``split``: cuts each output by the layout known from evidence (a declaration,
    samples, or a probe), and asks for a probe (:class:`LayoutUnknown`) when there is none.
    Thread-safe: several model threads may share it.

    Example::

        scatter = Scatter(declared={"output": 1})   # a sequence-first (T, B, D) output
        parts = scatter.split(model(batch), len(items))
    """

    def __init__(self, declared: Optional[Mapping[str, Any]] = None):
        self.declared = dict(declared or {})
        self._lock = threading.Lock()
        self._layout: Optional[Layout] = None
        self.source: Optional[str] = None  # where the layout in use came from, for messages

    @property
    def layout(self) -> Optional[Layout]:
        return self._layout

    def split(self, output: Any, count: int, to_host: Callable[[Any], Any] = lambda leaf: leaf) -> list:
        layout = self._layout
        if layout is not None:
            try:
                return cut(layout, output, count, to_host)
            except LayoutMismatch:
                pass  # this output is shaped otherwise: find its layout as for a first one
        if self.declared:
            layout = declared_layout(output, self.declared)
            if layout is not None:
                parts = cut(layout, output, count, to_host)
                self._use(layout, "declaration")
                return parts
        if not may_hold_a_batch(output, count):
            leaves = "; ".join(describe_leaves(output))
            raise SplitFailed(f"the model output of a micro-batch of {count} cannot be split per request: no part of "
                              f"it has the micro-batch size ({leaves}). To say how it is batched, {HOW_TO_FIX}")
        raise LayoutUnknown(count, lambda observations: self.learn(observations, "probe"))

    def learn(self, observations: Mapping[int, Any], source: str) -> Layout:
        """Learn the layout from outputs at two or more sizes; raises SplitFailed when ambiguous."""
        layout = learn_layout(observations, self.declared)
        self._use(layout, source)
        return layout

    def _use(self, layout: Layout, source: str) -> None:
        with self._lock:
            self._layout, self.source = layout, source
