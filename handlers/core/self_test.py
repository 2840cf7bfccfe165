"""The start-up self-test: the user's sample requests run alone and together at several
micro-batch sizes, before anything is served.

It proves two things on the model itself, not on guesses: the **batch layout** of its output
(which parts follow the micro-batch size, along which dimension: :mod:`handlers.engine.scatter`), and
that it is **batch-invariant**: each sample's answer beside other requests (what
``postprocess_one`` makes of its part, as a client receives it) equals its answer alone, within
a tolerance. That takes at least two different samples: with one, or copies of one, every
batch-mate is the sample itself and mixing cannot show (the summary says so). A model that mixes the requests of a batch (a layer in training mode,
padding that leaks into the result) is refused with one line naming the sample, the output part
and the difference. It doubles as the warm-up.

Samples travel in the archive (``microbatch_samples/`` in the model folder, written by
``python -m handlers.archive`` from the config's ``samples:``), so TorchServe, Ray Serve, the
test kit and ``python -m handlers.archive --check`` all run the same test.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from handlers.core.derived_inputs import derived_inputs, shorter_input
from handlers.core.request import Request, decoded_body
from handlers.engine.errors import SplitFailed, is_out_of_memory
from handlers.engine.scatter import children_of, child_path, is_array, learned_any, leaves_of, ROOT
from handlers.engine.settings import ConfigError

SAMPLES_DIR = "microbatch_samples"
SAMPLES_INDEX = "samples.json"
# Content types by file extension (a sample of another type names it in the config).
CONTENT_TYPES = {".json": "application/json", ".txt": "text/plain", ".npy": "application/octet-stream"}
BINARY = "application/octet-stream"
# Micro-batch sizes the samples run together at (plus the configured micro_batch_size, up to the cap).
TOGETHER_SIZES = (2, 3)
LARGEST_SIZE_TRIED = 64


SUMMARY_RECORD = "self_test_summary"  # set on the log record of a start's summary (summary_not_logged)


@contextlib.contextmanager
def summary_not_logged():
    """Starts meanwhile do not log their self-test's summary: a command that prints the summary
    itself (``python -m handlers.archive --check``) would show it twice."""
    logger = logging.getLogger("handlers.core.handler")
    muted = _NotTheSummary()
    logger.addFilter(muted)
    try:
        yield
    finally:
        logger.removeFilter(muted)


class _NotTheSummary(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(record, SUMMARY_RECORD, False)


class SelfTestFailed(ConfigError):
    """The model failed its self-test on the samples; the message says which sample, where, and why."""


@dataclass(frozen=True)
class Sample:
    """One sample request: its file name (for messages) and the request as a server hands it over."""

    name: str
    request: Request


@dataclass(frozen=True)
class SelfTestReport:
    samples: int
    model_calls: int
    sizes: tuple
    seconds: float
    layout_learned: Any  # how the layout was known ("learned (derived inputs included)", "declared"), or falsy
    distinct: int = 2  # different sample requests: batch invariance shows only beside a different one
    alone_reason: Optional[str] = None  # why requests are answered one per model call, if they are
    one_shape: bool = False  # every sample's input has the same shape and no shorter one could be derived
    padding: Optional[str] = None  # the derived input that made a micro-batch pad, when one did

    def summary(self) -> str:
        if self.alone_reason is not None:
            layout = (f"NO batch layout can be trusted ({self.alone_reason}): requests are answered one per model "
                      f"call (correct, slower; declare handler.batch_dims to batch them)")
            invariance = ""
        else:
            layout = f"batch layout {self.layout_learned}, " if self.layout_learned else ""
            invariance = ("answers batch-invariant" if self.distinct >= 2 else
                          "batch invariance NOT tested: it needs at least 2 different samples")
        padding = ("; every sample's input has the same shape, so padding to a longer batch-mate was NOT "
                   "exercised (add samples of different lengths)" if self.one_shape and self.distinct >= 2 else "")
        if self.padding:
            padding = f"; padding exercised with {self.padding}"
        return (f"self-test: {self.samples} sample(s) alone and together at micro-batch sizes "
                f"{', '.join(map(str, self.sizes))}: {layout}{invariance}{padding}; {self.model_calls} model calls "
                f"in {self.seconds:.2f} s")


def content_type_of(name: str) -> str:
    return CONTENT_TYPES.get(os.path.splitext(name)[1].lower(), BINARY)


def load_samples(model_dir: str) -> list:
    """The samples shipped in ``model_dir/microbatch_samples/`` (none when the folder is absent)."""
    folder = Path(model_dir) / SAMPLES_DIR
    index = folder / SAMPLES_INDEX
    if not index.is_file():
        return []
    samples = []
    for entry in json.loads(index.read_text()):
        body = (folder / entry["file"]).read_bytes()
        content_type = entry.get("content_type") or content_type_of(entry["file"])
        headers = {"Content-Type": content_type}
        name = entry.get("source") or entry["file"]
        samples.append(Sample(name, Request(decoded_body(body, content_type), headers)))
    return samples


def run_self_test(handler, samples: list, default_split: bool = True) -> SelfTestReport:
    """Run ``samples`` through ``handler`` (started, its engine not yet serving): alone, then
    together at :data:`TOGETHER_SIZES` and the configured micro-batch size. Learns the batch
    layout (when the handler uses the default ``split``: ``default_split``) and checks batch
    invariance.

    Raises:
        SelfTestFailed: one line naming the sample, the output part and the difference.
    """
    started = time.perf_counter()
    items = [_preprocessed(handler, sample) for sample in samples]
    calls = 0

    def forward(positions: list, out_of_memory_is_fatal: bool = True) -> Any:
        nonlocal calls
        calls += 1
        try:
            return handler._forward([items[p] for p in positions])
        except Exception as exc:  # noqa: BLE001 - named with the samples
            if not out_of_memory_is_fatal and is_out_of_memory(exc):
                return None  # this size does not fit: serving caps it the same way
            names = ", ".join(samples[p].name for p in positions)
            raise SelfTestFailed(f"self-test: the model raised on sample(s) {names}: {type(exc).__name__}: "
                                 f"{_first_line(exc)}") from None

    sizes = _sizes(handler)
    groups = {n: [(i + n) % len(samples) for i in range(n)] for n in sizes}  # each sample in turn
    alone = {p: forward([p]) for p in range(len(samples))}
    together = {n: forward(positions, out_of_memory_is_fatal=False) for n, positions in groups.items()}
    groups = {n: positions for n, positions in groups.items() if together[n] is not None}
    together = {n: output for n, output in together.items() if output is not None}
    if not together:
        raise SelfTestFailed(f"self-test: the model ran out of memory on every micro-batch of samples tried "
                             f"({', '.join(map(str, sizes))})")
    scatter = getattr(handler, "_scatter", None)
    learned = scatter is not None and default_split
    if learned:
        # Other data at the largest size that fitted, so that a size set by the data breaks step.
        largest = max(groups)
        derived = [output for variant in derived_inputs([items[p] for p in groups[largest]])
                   if (output := _derived_output(handler, variant)) is not None]
        calls += len(derived)
        observations = [(1, alone[0]), *together.items(), *((largest, output) for output in derived)]
        try:
            layout = scatter.learn(observations, "samples", varied=bool(derived))
            learned = layout is not None and ("learned (derived inputs included)" if learned_any(layout) else "declared")
        except SplitFailed as exc:
            raise SelfTestFailed(f"self-test: {exc.message}") from None
    rtol, atol = tolerance(handler)
    # The answers as clients get them: a model may pad a micro-batch (its raw output then
    # depends on the longest batch-mate) and postprocess_one trim it back.
    alone_answers = {p: _answer(handler, samples[p], _split(handler, output, 1)[0], items[p])
                     for p, output in alone.items()}
    alone_reason = scatter.alone_reason if scatter is not None and default_split else None
    for n, positions in groups.items():
        if alone_reason is not None:
            break  # nothing is cut: each request's answer is its own call's
        parts = _split(handler, together[n], n)
        for slot, (p, part) in enumerate(zip(positions, parts)):
            difference = first_difference(alone_answers[p], _answer(handler, samples[p], part, items[p]), rtol, atol,
                                          ANSWER)
            if difference:
                raise SelfTestFailed(
                    f"self-test: sample {samples[p].name} answers differently beside other requests (micro-batch "
                    f"of {n}, position {slot}): {difference} (tolerance rtol {rtol:g}, atol {atol:g}). The model "
                    f"mixes the requests of a batch: a layer left in training mode (BatchNorm, Dropout: call "
                    f"model.eval()), padding that leaks into the result, or a statistic over the batch"
                )
    distinct = len({_identity(sample.request) for sample in samples})
    one_shape = len({_shapes(item) for item in items}) == 1
    padding = None
    if one_shape and alone_reason is None and len(samples) >= 2:
        padding, padding_calls = _check_padding(handler, samples, items, rtol, atol)
        calls += padding_calls
    # Not exercised: no shorter input could be made (a model refusing one takes one length: no padding).
    return SelfTestReport(len(samples), calls, (1, *together), time.perf_counter() - started, learned, distinct,
                          alone_reason, one_shape and padding is None, padding or None)


def _check_padding(handler, samples: list, items: list, rtol: float, atol: float) -> tuple:
    """Samples all of one length never make a micro-batch pad: a shorter input derived from the
    first (its sequences cut to half) is answered alone and beside the others, and the two must
    agree. Returns ``(what was exercised, model calls)``: "" when the model takes no shorter
    input (nothing can pad), None when no such input can be made.

    Raises:
        SelfTestFailed: the shorter input answers differently beside longer ones (padding leaks)."""
    shorter = shorter_input(items[0])
    if shorter is None:
        return None, 0
    alone = _derived_output(handler, [shorter])
    if alone is None:
        return "", 1  # the model takes only inputs of that length: nothing pads
    beside = _derived_output(handler, [shorter, *items[1:]])
    if beside is None:
        return "", 2
    name = f"a shorter input derived from sample {samples[0].name} (its sequences cut to half)"
    difference = first_difference(_answer(handler, samples[0], _split(handler, alone, 1)[0], shorter),
                                  _answer(handler, samples[0], _split(handler, beside, len(items))[0], shorter),
                                  rtol, atol, ANSWER)
    if difference:
        raise SelfTestFailed(f"self-test: {name} answers differently beside longer samples: {difference} (tolerance "
                             f"rtol {rtol:g}, atol {atol:g}). The model mixes the requests of a batch: padding that "
                             f"leaks into the result (mask it: attention_mask, lengths)")
    return name, 2


def _derived_output(handler, items: list) -> Any:
    """The model's output on derived inputs; None when it refuses them (no evidence, no failure)."""
    try:
        return handler._forward(items)
    except Exception:  # noqa: BLE001 - blank or noise may be outside what the model takes
        return None


def _shapes(item: Any) -> tuple:
    """The shapes of the arrays in an item, in order (what padding would have to even out)."""
    return tuple(tuple(leaf.shape) if is_array(leaf) else (type(leaf).__name__, len(leaf) if isinstance(
        leaf, (str, bytes)) else None) for leaf in leaves_of(item).values())


# The least tolerance on a GPU, by the arithmetic it does: about 20 unit roundoffs u of the format
# the convolutions and matrix products round their operands (and, in half precision, every
# activation) to. A sample's answer alone and beside others need not take the same kernels: cuDNN
# picks its algorithm by batch size, so the roundings differ, and they add up over the layers
# (ResNet logits: ~1e-3 relative in TF32). float16 and TF32 keep 10 bits after the point (u = 2^-11
# = 4.9e-4): 1e-2. bfloat16 keeps 7 (u = 2^-8 = 3.9e-3): 8e-2. A batch that mixes its requests
# (training-mode BatchNorm, leaking padding) moves answers by their own size, far beyond either.
GPU_TOLERANCE = {"float16": 1e-2, "bfloat16": 8e-2, "tf32": 1e-2}


def tolerance(handler) -> tuple:
    """``(rtol, atol)`` from the handler's settings, at least :data:`GPU_TOLERANCE` on a GPU in
    half precision, or in float32 while torch lets cuDNN or cuBLAS compute in TF32."""
    rtol, atol = handler.config["invariance_rtol"], handler.config["invariance_atol"]
    floor = gpu_tolerance(handler.device, handler.config["precision"]) or 0.0
    return max(rtol, floor), max(atol, floor)


def gpu_tolerance(device: Any, precision: str) -> Optional[float]:
    """The least tolerance the arithmetic on ``device`` in ``precision`` allows (None: the settings' own)."""
    if getattr(device, "type", None) != "cuda":
        return None
    if precision != "float32":
        return GPU_TOLERANCE[precision]
    import torch

    try:
        medium = torch.get_float32_matmul_precision() == "medium"  # float32 matrix products in bfloat16
    except RuntimeError:  # torch refuses to say when its old and new switches were both set
        medium = False
    if medium:
        return GPU_TOLERANCE["bfloat16"]
    if torch.backends.cudnn.allow_tf32 or torch.backends.cuda.matmul.allow_tf32:
        return GPU_TOLERANCE["tf32"]
    return None


def first_difference(alone: Any, together: Any, rtol: float, atol: float, path: str = ROOT) -> Optional[str]:
    """Where two answers differ beyond the tolerance, in words; None when they agree."""
    if is_array(alone) or is_array(together):
        if not (is_array(alone) and is_array(together)):
            return f"{path} is a {type(alone).__name__} alone and a {type(together).__name__} together"
        if tuple(alone.shape) != tuple(together.shape):
            return f"{path} has shape {list(alone.shape)} alone and {list(together.shape)} together"
        return _array_difference(alone, together, rtol, atol, path)
    structure, other = children_of(alone), children_of(together)
    if structure is not None or other is not None:
        if structure is None or other is None or [k for k, _ in structure[1]] != [k for k, _ in other[1]]:
            return f"{path} is structured differently alone and together"
        for (key, a), (_, b) in zip(structure[1], other[1]):
            found = first_difference(a, b, rtol, atol, child_path(path, alone, key))
            if found:
                return found
        return None
    if isinstance(alone, float) or isinstance(together, float):
        if isinstance(alone, (int, float)) and isinstance(together, (int, float)) and (
            math.isclose(alone, together, rel_tol=rtol, abs_tol=atol) or (math.isnan(alone) and math.isnan(together))
        ):
            return None
    elif alone == together:
        return None
    return f"{path} is {alone!r} alone and {together!r} together"


def _array_difference(alone: Any, together: Any, rtol: float, atol: float, path: str) -> Optional[str]:
    import torch

    a = torch.as_tensor(alone).detach().cpu()
    b = torch.as_tensor(together).detach().cpu()
    if not (a.is_floating_point() or a.is_complex() or b.is_floating_point()):
        unequal = a != b
    else:
        a, b = a.double(), b.double()
        unequal = ~torch.isclose(a, b, rtol=rtol, atol=atol, equal_nan=True)
    if not bool(unequal.any()):
        return None
    where = tuple(int(i) for i in unequal.nonzero()[0])
    index = "".join(f"[{i}]" for i in where)
    return f"{path}{index} is {a[where].item():.6g} alone and {b[where].item():.6g} together"


ANSWER = "answer"


def _answer(handler, sample: Sample, part: Any, item: Any) -> Any:
    """The sample's answer from its part of an output, as the client receives it (JSON values)."""
    try:
        return handler._postprocess_one_encoded(part, item).value
    except Exception as exc:  # noqa: BLE001 - a sample whose answer cannot be made is a broken handler
        raise SelfTestFailed(f"self-test: postprocess_one raised on sample {sample.name}: {type(exc).__name__}: "
                             f"{_first_line(exc)}") from None


def _identity(request: Request) -> str:
    """What makes two sample requests the same request: body and headers."""
    return repr((request.body, sorted(request.headers.items())))


def _preprocessed(handler, sample: Sample) -> Any:
    try:
        return handler._preprocess_request(sample.request)
    except Exception as exc:  # noqa: BLE001 - a sample the handler refuses is a broken config
        raise SelfTestFailed(f"self-test: sample {sample.name} is refused by preprocess_one: {type(exc).__name__}: "
                             f"{_first_line(exc)}") from None


def _split(handler, output: Any, count: int) -> list:
    try:
        return list(handler._split_on_host(output, count))
    except Exception as exc:  # noqa: BLE001 - named as the self-test's finding
        raise SelfTestFailed(f"self-test: {_first_line(exc)}") from None


def _sizes(handler) -> tuple:
    sizes = list(TOGETHER_SIZES)
    configured = handler.settings.micro_batch_size
    if configured and configured not in sizes and configured <= LARGEST_SIZE_TRIED:
        sizes.append(configured)
    return tuple(sizes)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
