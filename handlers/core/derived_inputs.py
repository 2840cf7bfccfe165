"""Inputs derived from real ones, for evidence that a batch dimension does not depend on the data.

Samples with one box each cannot tell a box count from the batch size: both follow it. Running
the model on other data of the same shapes, at the same micro-batch size, can: a blank image
has no boxes, noise has some other number. A dimension that still follows the micro-batch size
on every input is taken as the batch; one that breaks step is set by the data.

Pure functions: each derivation copies; the items passed in are never changed.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch

from handlers.engine.scatter import children_of, rebuild

SEED = 20261206


def derived_inputs(items: list) -> list:
    """``[blank, noise]``: two copies of ``items`` (one micro-batch's preprocessed items) with the
    data in them replaced, shapes and dtypes kept: zeros, then values drawn uniformly from each
    array's own range (so an attention mask of ones stays ones, token ids stay in range). The
    data is every tensor and array, every float, and an item that is a bare number; other
    fields (an int such as ``top_k``, strings) are kept. ``[]`` when no item holds data."""
    rng = np.random.default_rng(SEED)
    try:
        blank, found = _replaced(items, _blank)
        if not found:
            return []
        noise, _ = _replaced(items, lambda value: _noise(value, rng))
    except (TypeError, ValueError, RuntimeError):  # data of a kind that cannot be varied: no evidence
        return []
    return [blank, noise]


def _replaced(items: list, change: Callable[[Any], Any]) -> tuple:
    found = False

    def visit(node: Any, bare: bool) -> Any:
        nonlocal found
        if isinstance(node, (torch.Tensor, np.ndarray)) or (
                isinstance(node, float) or bare and isinstance(node, int)) and not isinstance(node, bool):
            found = True
            return change(node)
        if isinstance(node, (list, tuple)) and node and all(_is_number(v) for v in node):
            found = True  # a sequence of numbers (token ids) is data, varied as an array
            return type(node)(change(np.asarray(node)).tolist()) if not hasattr(node, "_fields") else node
        structure = children_of(node)
        if structure is None:
            return node
        kind, entries = structure
        return rebuild(node, kind, tuple(key for key, _ in entries), [visit(child, False) for _, child in entries])

    return [visit(item, True) for item in items], found


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _blank(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return torch.zeros_like(value)
    if isinstance(value, np.ndarray):
        return np.zeros_like(value)
    return type(value)(0)


def _noise(value: Any, rng: np.random.Generator) -> Any:
    if isinstance(value, torch.Tensor):
        host = value.detach().cpu()
        drawn = torch.from_numpy(_noise(host.float().numpy() if host.dtype == torch.bfloat16 else host.numpy(), rng))
        return drawn.to(dtype=host.dtype, device=value.device)
    if isinstance(value, np.ndarray):
        if value.size == 0:
            return value.copy()
        if value.dtype == np.bool_:
            return rng.random(value.shape) < 0.5
        low, high = value.min(), value.max()
        if np.issubdtype(value.dtype, np.integer):
            return rng.integers(int(low), int(high), size=value.shape, endpoint=True).astype(value.dtype)
        low, high = float(low), float(high)
        if not np.isfinite(low) or not np.isfinite(high):
            low, high = -1.0, 1.0
        if low == high:
            low, high = low - 1.0, high + 1.0
        return rng.uniform(low, high, size=value.shape).astype(value.dtype)
    if isinstance(value, float):
        return float(rng.uniform(-2 * abs(value) - 1, 2 * abs(value) + 1))
    return int(rng.integers(0, 2 * abs(value) + 2))


def shorter_input(item: Any) -> Any:
    """A copy of ``item`` with every sequence in it (a tensor or array along its first dimension,
    a list of numbers) cut to its first half: beside the original, it makes a micro-batch pad,
    which samples of one length never do. None when the item holds nothing of two or more."""
    found = False

    def visit(node: Any) -> Any:
        nonlocal found
        if isinstance(node, (torch.Tensor, np.ndarray)):
            if node.ndim < 1 or node.shape[0] < 2:
                return node
            found = True
            half = node[: (node.shape[0] + 1) // 2]
            return half.clone() if isinstance(node, torch.Tensor) else half.copy()
        if isinstance(node, list) and len(node) >= 2 and all(_is_number(v) for v in node):
            found = True
            return node[: (len(node) + 1) // 2]
        structure = children_of(node)
        if structure is None:
            return node
        kind, entries = structure
        return rebuild(node, kind, tuple(key for key, _ in entries), [visit(child) for _, child in entries])

    shorter = visit(item)
    return shorter if found else None
