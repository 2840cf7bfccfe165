"""AOTInductor packages (``handler.compile.aot``): the handler's ``infer`` exported with
``torch.export`` and compiled ahead of time, one package per bucket, by ``python -m
handlers.archive`` into the archive's ``aot/`` folder. A worker then loads compiled code in a
fraction of a second instead of compiling at start-up.

A package is compiled for one torch release, one device and one input: the shapes, dtypes and
strides of the micro-batch it was exported at. So loading checks the release and the device (a
worker that does not match runs eager, said in one line), and each micro-batch's inputs are
checked against the packages' before one runs it: inputs that match none (a text of another
length, a short micro-batch not padded) run eager. A package never sees inputs it was not built
for.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

AOT_FOLDER = "aot"  # in the model's folder (the archive's root)
INDEX = "packages.json"


class AotUnusable(RuntimeError):
    """The archive's packages cannot serve this worker (another torch, another device, a package
    that does not load or does not take the samples' micro-batches)."""


def signature(batch: Any) -> list:
    """What a compiled package assumes of its input: the tree's structure and, per leaf, a
    tensor's shape, stride, dtype and device (or the value itself, which export specialised on)."""
    import torch
    from torch.utils._pytree import tree_flatten

    leaves, spec = tree_flatten(batch)
    described = [["tensor", list(leaf.shape), list(leaf.stride()), str(leaf.dtype), leaf.device.type]
                 if isinstance(leaf, torch.Tensor) else ["value", repr(leaf)] for leaf in leaves]
    return [str(spec), described]


class _Infer:
    """``handler.infer`` as a module for ``torch.export``: the model is registered so that its
    parameters are lifted as the program's weights, not inlined as constants. Its output is
    flattened to a tuple of leaves: a package cannot record every output type's structure
    (``torch.return_types.topk`` has no serialised name); a worker takes it from eager's answer
    to the same micro-batch at its start-up check (:meth:`Packages.strict`)."""

    @staticmethod
    def module(handler):
        import torch
        from torch.utils._pytree import tree_flatten

        class Infer(torch.nn.Module):
            def __init__(self):
                super().__init__()
                if isinstance(handler.model, torch.nn.Module):
                    self.model = handler.model

            def forward(self, batch):
                return tuple(tree_flatten(handler.infer(batch))[0])

        return Infer().eval()


def build_packages(handler, sizes: tuple, samples: list, folder: Path) -> list:
    """Export and compile ``handler.infer`` at each of ``sizes``, on copies of the samples' items
    collated as a worker collates them, into ``folder`` (one ``bucket_N.pt2`` each, and the index
    :data:`INDEX`). Returns the sizes built. Raises what export or AOTInductor raised."""
    import torch
    import torch._inductor

    from handlers.engine.settings import usable_cores

    folder.mkdir(parents=True, exist_ok=True)
    items = [handler._preprocess_request(sample.request) for sample in samples]
    module = _Infer.module(handler)
    entries = {}
    # Inductor writes the CPU thread count into the code it generates: that of a TorchServe worker
    # of this model on this machine (not whatever this process last ran with); a worker that runs
    # another count runs eager (load_packages).
    threads = handler.worker_threads() or usable_cores()  # torch's default, one per core, in a fresh worker
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for size in sizes:
            with torch.no_grad():
                batch = handler.collate([items[i % len(items)] for i in range(size)])
                exported = torch.export.export(module, (batch,), strict=False)
                name = f"bucket_{size}.pt2"
                torch._inductor.aoti_compile_and_package(exported, package_path=str(folder / name))
            entries[str(size)] = {"file": name, "inputs": signature(batch)}
    finally:
        torch.set_num_threads(before)
    index = {"torch": torch.__version__, "device": handler.device.type, "threads": threads, "packages": entries}
    (folder / INDEX).write_text(json.dumps(index, indent=1) + "\n")
    return list(sizes)


class Packages:
    """The loaded packages as one ``infer``: a micro-batch whose inputs match a package's runs it,
    any other runs ``handler.infer`` (eager). :attr:`strict` refuses instead (the start-up check:
    a package the samples' micro-batches do not reach is not checked, so not trusted)."""

    def __init__(self, handler, runners: dict, built_with: str):
        self._eager = handler.infer
        self._runners = runners  # signature (as JSON text) -> (size, the loaded package)
        self._structures: dict = {}  # signature -> the output's structure, from eager's (strict)
        self.sizes = tuple(sorted(size for size, _ in runners.values()))
        self.built_with = built_with

    def __call__(self, batch: Any) -> Any:
        key = json.dumps(signature(batch))
        found, structure = self._runners.get(key), self._structures.get(key)
        if found is None or structure is None:
            return self._eager(batch)
        return self._unflatten(found[1](batch), structure)

    def strict(self, batch: Any) -> Any:
        from torch.utils._pytree import tree_flatten

        key = json.dumps(signature(batch))
        found = self._runners.get(key)
        if found is None:
            raise AotUnusable("the samples' micro-batches do not match the inputs the packages were built for "
                              f"(sizes {', '.join(map(str, self.sizes))}): archive the model again")
        structure = tree_flatten(self._eager(batch))[1]
        leaves = found[1](batch)
        if len(leaves) != structure.num_leaves:
            raise AotUnusable(f"the package for micro-batch size {found[0]} answers {len(leaves)} tensors where "
                              f"eager answers {structure.num_leaves}: archive the model again")
        self._structures[key] = structure
        return self._unflatten(leaves, structure)

    @staticmethod
    def _unflatten(leaves: Any, structure: Any) -> Any:
        from torch.utils._pytree import tree_unflatten

        return tree_unflatten(list(leaves), structure)


def load_packages(handler) -> Optional[Packages]:
    """The packages in the handler's model folder, checked against this worker's torch and device
    (:class:`AotUnusable` says why not), or None when the folder has none."""
    import torch
    from torch._inductor.package import load_package

    folder = Path(handler.model_dir) / AOT_FOLDER
    if not (folder / INDEX).is_file():
        return None
    index = json.loads((folder / INDEX).read_text())
    if index.get("torch") != torch.__version__:
        raise AotUnusable(f"the archive's AOTInductor packages were built with torch {index.get('torch')} and this "
                          f"worker has torch {torch.__version__}: archive the model again with this torch")
    if index.get("device") != handler.device.type:
        raise AotUnusable(f"the archive's AOTInductor packages were built for {index.get('device')} and this worker "
                          f"runs on {handler.device.type}")
    if handler.device.type == "cpu" and index.get("threads") != torch.get_num_threads():
        raise AotUnusable(f"the archive's AOTInductor packages were built for {index.get('threads')} CPU thread(s) per "
                          f"micro-batch and this worker runs {torch.get_num_threads()}: archive the model on a machine "
                          "with the servers' cores, or set handler.torch_threads")
    runners = {}
    for size, entry in index.get("packages", {}).items():
        path = folder / entry["file"]
        try:
            # One runner per micro-batch on the model at once (inference_workers), sharing the
            # weights: a package with one runs its calls one at a time.
            runner = load_package(str(path), num_runners=handler.settings.inference_workers)
        except Exception as exc:  # noqa: BLE001 - a package that does not load: said in one line
            raise AotUnusable(f"{path.name} does not load: {type(exc).__name__}: {_first_line(exc)}") from None
        runners[json.dumps(entry["inputs"])] = (int(size), runner)
    if not runners:
        raise AotUnusable(f"{os.path.join(AOT_FOLDER, INDEX)} lists no packages")
    return Packages(handler, runners, f"built with torch {index['torch']} for {index['device']}")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
