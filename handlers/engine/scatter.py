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
   used for every later call; an output it does not fit refutes it (below).

Learning from calls at two or more sizes ``n``: a tensor dimension whose size is ``n`` in every
call carries the batch (exactly one such dimension, else the output is ambiguous); a list whose
length is ``n`` in every call holds one entry per request, one whose length stays fixed is a
structure (heads, feature maps) cut entry by entry; tuples, dicts, named tuples and dataclasses
are structures. A part that does not follow the batch belongs to no single request, unless
declared ``"shared"``: such an output is answered alone (below).

A lone request is probed too (with itself twice over), so that its answer has the same shape
alone as beside others.

**A batch dimension must not depend on the data.** Samples with one box each cannot tell a box
count from the batch size: both follow it. So a layout is learned only from calls that include
inputs derived from the real ones (blank and noise of the same shapes, see
:func:`handlers.core.self_test.derived_inputs`), at the same micro-batch size: a size set by the
data then breaks step and the dimension is not taken. Where no such input can be made the
evidence is thin and the layout is not trusted. At run time an output that contradicts the layout
in use (learned or declared) **refutes it for good**: no later coincidence is cut into a 200.

Where no layout is known, trusted and unrefuted, the requests are **answered alone**: one model
call each, whose whole output is the request's own (:class:`AnswerAlone`); correct, and slower,
with one warning line naming the part and the declaration that would restore batching.

Two declarations cover outputs sized by the data (detectors): ``{'index_column': c}`` for one
flat tensor whose rows name their request in column ``c`` (batched_nms style, ONNX
NonMaxSuppression's ``(K, 3)`` triples), each request getting its rows with that column set to 0
as if alone; and ``{'counts': "output['counts']"}`` for values cut into consecutive segments by
a per-request counts tensor.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import threading
from collections import abc
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence

from handlers.engine.errors import SplitFailed

log = logging.getLogger(__name__)

HOW_TO_FIX = ("declare it in the handler's settings, e.g. handler.batch_dims: {'output': 0} (a tensor's batch "
              "dimension, 'items' for a list with one entry per request, 'shared' for a value common to all, "
              "{'index_column': 0} for rows that name their request in a column, {'counts': \"output['counts']\"} "
              "for values cut by per-request counts), ship samples with the archive (samples: in the archiver "
              "config), or override split(output, count)")
ROOT = "output"
ITEMS = "items"
SHARED = "shared"
INDEX_COLUMN = "index_column"
COUNTS = "counts"


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
class IndexColumn:
    """Rows of one tensor for the whole micro-batch (dimension 0), each naming its request's
    position in column ``column`` (declared only: a size set by the data is never learned)."""

    column: int


@dataclass(frozen=True)
class Segments:
    """Values along dimension 0 cut into consecutive segments, one per request, by the counts
    at the output path ``counts`` (declared only)."""

    counts: str


@dataclass(frozen=True)
class Fields:
    """A structure: ``kind`` is mapping, tuple, dataclass or list (fixed length); each child has
    its own layout."""

    kind: str
    keys: tuple
    children: tuple


Layout = Any  # Batched | Items | Shared | IndexColumn | Segments | Fields


def declared_special(wanted: Any) -> Optional[Layout]:
    """The layout of a ``{'index_column': c}`` or ``{'counts': path}`` declaration; None for others."""
    if isinstance(wanted, Mapping) and len(wanted) == 1:
        (key, value), = wanted.items()
        if key == INDEX_COLUMN and isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return IndexColumn(value)
        if key == COUNTS and isinstance(value, str) and value.startswith(ROOT):
            return Segments(value)
    return None


class LayoutMismatch(SplitFailed):
    """An output does not fit the layout in use (its structure or a batched size changed)."""


class DeclarationContradicted(SplitFailed):
    """A declared part of the layout does not fit what the model returned."""


class LayoutAmbiguous(SplitFailed):
    """Several dimensions followed the micro-batch size at every size seen: another size may tell."""


class LayoutUnknown(Exception):
    """No evidence yet for this output's layout: the caller probes the model at another size and
    hands both outputs to :meth:`learn`. Not an error a request ever sees. ``alone``, for a
    micro-batch of one: its output as the request would get it answered alone, for when no probe
    can run (out of memory at twice the size)."""

    def __init__(self, count: int, learn: Callable[[Mapping[int, Any]], None],
                 alone: Optional[Callable[[], list]] = None):
        super().__init__(f"the batch layout of this output is unknown (micro-batch of {count})")
        self.count = count
        self.learn = learn
        self.alone = alone


class AnswerAlone(Exception):
    """No layout can be trusted for this output: call the model once per request, whose whole
    output is that request's own. Not an error a request ever sees."""


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


def learn_layout(observations: "Mapping[int, Any] | Sequence[tuple]", declared: Mapping[str, Any] = {}) -> Layout:
    """The layout of an output from calls at two or more distinct micro-batch sizes
    (``{size: output}``, or ``[(size, output), ...]`` where a size may come more than once:
    calls on other data at the same size), with ``declared`` parts taken as given (and checked).

    Raises:
        SplitFailed: the evidence is ambiguous or the output cannot be cut per request; the
            message names the path, the sizes seen and how to fix it.
    """
    seen = sorted(observations.items() if isinstance(observations, Mapping) else observations, key=lambda o: o[0])
    if len({n for n, _ in seen}) < 2:
        raise ValueError("learning a batch layout needs outputs at two or more micro-batch sizes")
    return _learn(seen, declared, ROOT)


def _learn(seen: list, declared: Mapping[str, Any], path: str) -> Layout:
    sizes = [n for n, _ in seen]
    nodes = [node for _, node in seen]
    wanted = declared.get(path)
    if wanted == SHARED:
        return Shared()
    special = declared_special(wanted)
    if special is not None:
        if not all(is_array(node) and (isinstance(special, Segments) or len(node.shape) >= 2) for node in nodes):
            _refuse(path, f"is declared {wanted!r} but is not a tensor of rows ({describe_leaves(nodes[0], path)[0]})", DeclarationContradicted)
        return special
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
                    _refuse(path, f"is declared 'items' but has {_counts(lengths)} entries at micro-batch sizes {_sizes(sizes)}", DeclarationContradicted)
                return Items()
            if len(set(lengths)) > 1:
                _refuse(path, f"is a list of {_counts(lengths)} entries at micro-batch sizes {_sizes(sizes)}: neither one "
                              f"entry per request nor a fixed number")
        if wanted is not None:
            _refuse(path, f"is a {kind}: declare the batch dimension of its parts, not of the {kind}", DeclarationContradicted)
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
            _refuse(path, f"is declared with batch dimension {wanted!r}, but it is a tensor of {rank} dimensions", DeclarationContradicted)
        dim = wanted % rank
        if dim not in following:
            _refuse(path, f"is declared with batch dimension {wanted}, but its sizes there do not follow the "
                          f"micro-batch size: {_shapes(shapes, sizes)}", DeclarationContradicted)
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
    special = declared_special(wanted)
    if special is not None:
        return special if is_array(output) else None
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
        path: str = ROOT, root: Any = None) -> list:
    """``output`` of a micro-batch of ``count`` → ``count`` outputs, by ``layout``.

    Raises:
        LayoutMismatch: the output does not fit the layout; nothing was handed out.
    """
    root = output if root is None else root
    if isinstance(layout, IndexColumn):
        return _cut_by_index_column(layout.column, output, count, to_host, path)
    if isinstance(layout, Segments):
        return _cut_by_counts(layout.counts, output, count, to_host, path, root)
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
    columns = [cut(child_layout, child, count, to_host, child_path(path, output, key), root)
               for child_layout, (key, child) in zip(layout.children, structure[1])]
    return [rebuild(output, layout.kind, layout.keys, [column[i] for column in columns]) for i in range(count)]


def _whole_numbers(values: list, path: str, what: str) -> list:
    """``values`` as ints, or LayoutMismatch naming the first that is not a whole number."""
    numbers = []
    for value in values:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or int(value) != value:
            raise LayoutMismatch(f"{path} holds {value!r} as {what}, not a whole number")
        numbers.append(int(value))
    return numbers


def _cut_by_index_column(column: int, output: Any, count: int, to_host: Callable, path: str) -> list:
    """Each request's rows of a flat output (in order), its index column set to 0 as if alone."""
    if not is_array(output) or len(output.shape) < 2 or output.shape[1] <= column:
        shape = list(output.shape) if is_array(output) else type(output).__name__
        raise LayoutMismatch(f"{path} is {shape}, not rows with a request index in column {column} as declared")
    leaf = to_host(output)
    owners = _whole_numbers(leaf[:, column].tolist(), path, f"the request index (column {column})")
    stray = [owner for owner in owners if not 0 <= owner < count]
    if stray:
        raise LayoutMismatch(f"{path} names request {stray[0]} in column {column}, outside a micro-batch of {count}")
    rows: list = [[] for _ in range(count)]
    for row, owner in enumerate(owners):
        rows[owner].append(row)
    parts = []
    for mine in rows:
        part = leaf[mine] if mine else leaf[0:0]  # a copy (advanced indexing): the column is written below
        if mine:
            part[:, column] = 0
        parts.append(part)
    return parts


def _cut_by_counts(counts_path: str, output: Any, count: int, to_host: Callable, path: str, root: Any) -> list:
    """Consecutive segments of ``output`` along dimension 0, one per request, by its count."""
    counts = leaf_at(root, counts_path)
    if not is_array(output) or not is_array(counts) or len(counts.shape) != 1 or counts.shape[0] != count:
        found = list(counts.shape) if is_array(counts) else type(counts).__name__
        raise LayoutMismatch(f"{path} is cut by the counts at {counts_path}, which is {found}, not one count for "
                             f"each of {count} requests")
    sizes = _whole_numbers(to_host(counts).tolist(), counts_path, "a count")
    if any(size < 0 for size in sizes) or not len(output.shape) or sum(sizes) != output.shape[0]:
        total = output.shape[0] if len(output.shape) else "no"
        raise LayoutMismatch(f"{path} has {total} rows, but the counts at {counts_path} add up to {sum(sizes)}")
    leaf, parts, start = to_host(output), [], 0
    for size in sizes:
        parts.append(leaf[start:start + size])
        start += size
    return parts


def leaves_of(node: Any, path: str = ROOT) -> dict:
    """``{path: leaf}`` of every tensor (or other leaf) in an output, paths as messages print them."""
    structure = None if is_array(node) else children_of(node)
    if structure is None:
        return {path: node}
    found: dict = {}
    for key, child in structure[1]:
        found.update(leaves_of(child, child_path(path, node, key)))
    return found


def leaf_at(root: Any, path: str) -> Any:
    """The leaf of ``root`` at ``path``; LayoutMismatch when there is none."""
    leaves = leaves_of(root)
    if path not in leaves:
        raise LayoutMismatch(f"the output has no part {path} (its parts: {', '.join(list(leaves)[:8])})")
    return leaves[path]


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
    or samples and probes that include derived inputs), asks for a probe (:class:`LayoutUnknown`)
    when there is none yet, and asks for each request to be answered alone (:class:`AnswerAlone`)
    once no layout can be trusted: the evidence was thin or contradicted, or the output has no
    part that follows the micro-batch size. Refutation is for good. Thread-safe: several model
    threads may share it.

    Example::

        scatter = Scatter(declared={"output": 1})   # a sequence-first (T, B, D) output
        parts = scatter.split(model(batch), len(items))
    """

    def __init__(self, declared: Optional[Mapping[str, Any]] = None):
        self.declared = with_counts_declared(declared or {})
        self._lock = threading.Lock()
        self._layout: Optional[Layout] = None
        self.source: Optional[str] = None  # where the layout in use came from, for messages
        self.alone_reason: Optional[str] = None  # why requests are answered alone, once they are
        self._for_one: Optional[Layout] = None  # cuts a lone output once answering alone (see answer_alone)

    @property
    def layout(self) -> Optional[Layout]:
        return self._layout

    @property
    def answers_alone(self) -> bool:
        """True once no layout can be trusted: every request gets a model call of its own."""
        return self.alone_reason is not None

    def split(self, output: Any, count: int, to_host: Callable[[Any], Any] = lambda leaf: leaf) -> list:
        if self.alone_reason is not None:
            return self._whole(output, count, to_host)
        layout, source = self._layout, self.source
        if layout is None and self.declared:
            layout, source = declared_layout(output, self.declared), "declaration"
        if layout is not None:
            try:
                parts = cut(layout, output, count, to_host)
            except LayoutMismatch as exc:
                self.answer_alone(f"the {source}'s layout is contradicted: {exc.message}", [(count, output)])
                return self._whole(output, count, to_host)
            if source == "declaration":
                self._use(layout, source)
            return parts
        if not may_hold_a_batch(output, count):
            leaves = "; ".join(describe_leaves(output))
            self.answer_alone(f"no part of the output of a micro-batch of {count} has its size ({leaves})",
                              [(count, output)])
            return self._whole(output, count, to_host)
        raise LayoutUnknown(count, lambda observations, varied=True: self.learn(observations, "probe", varied,
                                                                                 strict=False),
                            alone=(lambda: [map_arrays(output, to_host)]) if count == 1 else None)

    def learn(self, observations: "Mapping[int, Any] | Sequence[tuple]", source: str,
              varied: bool = True, strict: bool = True) -> Optional[Layout]:
        """Learn the layout from outputs at two or more sizes. ``varied``: the calls included
        inputs derived from the real ones at the same size (blank, noise), so that a size set by
        the data shows; without them the evidence is thin and the layout is not trusted.

        Returns the layout, or None when requests are to be answered alone from now on.
        Raises LayoutAmbiguous while fewer than 3 sizes were seen (another size may tell), and
        DeclarationContradicted when ``strict`` (at start-up: a declaration to fix now)."""
        seen = list(observations.items() if isinstance(observations, Mapping) else observations)
        try:
            layout = learn_layout(seen, self.declared)
        except SplitFailed as exc:
            if isinstance(exc, LayoutAmbiguous) and len({n for n, _ in seen}) < 3 or \
                    isinstance(exc, DeclarationContradicted) and strict:
                raise
            self.answer_alone(_problem(exc.message), seen)
            return None
        if not varied and learned_any(layout):
            self.answer_alone("the evidence is thin: no input derived from the " + source + " (blank, noise) could "
                              "be run, so a size set by the data cannot be told from the micro-batch size", seen,
                              for_one=layout)
            return None
        self._use(layout, source)
        return layout

    def answer_alone(self, reason: str, observations: Sequence[tuple] = (), for_one: Optional[Layout] = None) -> None:
        """From now on every request gets a model call of its own; logged once, with the
        declaration that would restore batching where the outputs seen suggest one.

        ``for_one``: a layout no output contradicted (it was not proven, or the model's answers
        change with their batch-mates), which still cuts a lone call's output where it fits, so
        that ``postprocess_one`` gets the part it always got; else it gets the whole output."""
        with self._lock:
            if self.alone_reason is not None:
                return
            self.alone_reason = reason
            self._for_one = for_one
            self._layout, self.source = None, None
        hints = suggest_declarations(observations)
        hint = (f"if that is how it is batched, declare handler.batch_dims: {{{', '.join(hints)}}}" if hints else
                f"to batch them, {HOW_TO_FIX}")
        log.warning("the model output cannot be cut per request by evidence (%s): requests are answered one per "
                    "model call from now on (correct, slower); %s", reason, hint)

    def _whole(self, output: Any, count: int, to_host: Callable) -> list:
        if count != 1:
            raise AnswerAlone(self.alone_reason)
        if self._for_one is not None:
            try:
                return cut(self._for_one, output, 1, to_host)
            except LayoutMismatch:
                pass
        return [map_arrays(output, to_host)]

    def _use(self, layout: Layout, source: str) -> None:
        with self._lock:
            if self.alone_reason is None:
                self._layout, self.source = layout, source


def with_counts_declared(declared: Mapping[str, Any]) -> dict:
    """``declared``, with the counts a ``{'counts': path}`` declaration names cut along dimension 0
    (one count per request), unless declared otherwise."""
    full = dict(declared)
    for wanted in declared.values():
        special = declared_special(wanted)
        if isinstance(special, Segments):
            full.setdefault(special.counts, 0)
    return full


def _problem(message: str) -> str:
    """The finding of a refusal message, without its how-to-fix tail."""
    return message.split(". To say how it is batched")[0].replace("the model output cannot be split per request: ", "")


def learned_any(layout: Layout) -> bool:
    """Whether ``layout`` cuts anything by a size (a tensor's dimension, a list's entries):
    what thin evidence cannot vouch for. (Learning runs only where some part is undeclared.)"""
    if isinstance(layout, Fields):
        return any(learned_any(child) for child in layout.children)
    return isinstance(layout, (Batched, Items))


def suggest_declarations(observations: Sequence[tuple]) -> list:
    """Declarations (``"'path': ..."``) that fit every output seen (``[(size, output)]``): a batch
    dimension that follows the size in all of them, a column that names a request in range in
    every row, or counts that add up to a part's rows. Advice for a message, never used to cut."""
    leaf_maps = [(n, leaves_of(output)) for n, output in observations]
    if not leaf_maps:
        return []
    paths = [p for p in leaf_maps[0][1] if all(p in leaves and is_array(leaves[p]) for _, leaves in leaf_maps)]
    hints = []
    for path in paths:
        shapes = [(n, tuple(leaves[path].shape)) for n, leaves in leaf_maps]
        counted = [c for c in paths if c != path and _adds_up(leaf_maps, path, c)]
        if counted:
            hints.append(f"\"{path}\": {{'counts': \"{counted[0]}\"}}")
            continue
        following = [d for d in range(len(shapes[0][1])) if all(len(s) > d and s[d] == n for n, s in shapes)]
        column = _index_column(leaf_maps, path)
        if column is not None and (not following or following == [0]):
            hints.append(f"\"{path}\": {{'index_column': {column}}}")
        elif len(following) == 1:
            hints.append(f"\"{path}\": {following[0]}")
    return hints


def _index_column(leaf_maps: list, path: str) -> Optional[int]:
    """The first column whose values name a request in range (0..size-1) in every output seen."""
    leaves = [(n, leaves[path]) for n, leaves in leaf_maps]
    if not all(len(leaf.shape) == 2 for _, leaf in leaves):
        return None
    for column in range(min(int(leaf.shape[1]) for _, leaf in leaves)):
        try:
            named = [(n, leaf[:, column].tolist()) for n, leaf in leaves]
        except (TypeError, ValueError):
            return None
        in_range = all(all(v == int(v) and 0 <= v < n for v in values) for n, values in named)
        # A column of zeros (an empty feature) is no index: some output must name two requests.
        if in_range and any(len(set(values)) >= 2 for _, values in named):
            return column
    return None


def _adds_up(leaf_maps: list, values_path: str, counts_path: str) -> bool:
    """Whether the 1-D part at ``counts_path`` has one whole count per request adding up to the
    rows at ``values_path`` in every output seen (and those rows are not simply the size)."""
    try:
        for n, leaves in leaf_maps:
            counts, values = leaves[counts_path], leaves[values_path]
            numbers = counts.tolist()
            if len(counts.shape) != 1 or len(numbers) != n or not len(values.shape) or \
                    any(v != int(v) or v < 0 for v in numbers) or sum(numbers) != values.shape[0]:
                return False
    except (TypeError, ValueError):
        return False
    return any(leaves[values_path].shape[0] != n for n, leaves in leaf_maps)
