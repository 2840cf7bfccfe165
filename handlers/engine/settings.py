"""Handler settings: read once at start-up from the model config's ``handler:`` section and
checked with messages that name the key, the rule and the bad value."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

from handlers.engine.sizing import sizing_names

SECTION = "handler"
# Leave the server room to send our error answers before it gives up on the worker.
DEADLINE_SHARE_OF_SERVER_TIMEOUT = 0.8
DEFAULT_DEADLINE_S = 60.0


class ConfigError(ValueError):
    """A setting in the model config is missing, of the wrong type or out of range; one line per
    problem when a section has several (they are reported at once)."""

    @property
    def problems(self) -> list:
        """The message's problems, one per line."""
        return [line for line in str(self).splitlines() if line.strip()] or [str(self)]


class ConfigProblems:
    """Every problem of a config section, collected so that they are reported at once rather
    than one per run."""

    def __init__(self):
        self.lines: list = []

    def check(self, check, *args, **kwargs):
        """``check(*args, **kwargs)``, or None with its ConfigError's problems recorded."""
        try:
            return check(*args, **kwargs)
        except ConfigError as exc:
            self.lines += exc.problems
            return None

    def raise_any(self) -> None:
        if self.lines:
            raise ConfigError("\n".join(self.lines))


def usable_cores() -> int:
    """Cores this process may run on (respects CPU affinity, unlike ``os.cpu_count``)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return max(1, os.cpu_count() or 1)


def shared_threads(threads: int, inference_workers: int) -> int:
    """torch's threads when ``inference_workers`` micro-batches run on the model at once and the
    handler's ``torch_threads`` is 0: the ``threads`` torch would use, shared among them (at least
    1 each). Each micro-batch's operators then run on threads of their own instead of all of them
    waiting, at every operator, for the slowest of all the cores: on a 2-core machine another
    process using 30% of a core cut ResNet-18 from 71 to 52 images/s with one micro-batch on 2
    threads, and from 75 to 61 with two on 1 thread each. One worker: ``threads``, unchanged."""
    return max(1, threads // max(1, inference_workers))


@dataclass(frozen=True)
class EngineSettings:
    """How the batching engine runs one batch.

    Attributes:
        micro_batch_size: items per micro-batch; ``None`` runs the whole batch at once.
        micro_batch_strategy: ``static`` (``micro_batch_size``), ``dynamic`` (one micro-batch per
            pool thread, at least two) or ``adaptive`` (learned from measured costs).
        pool_size: threads that preprocess and postprocess requests.
        inference_workers: micro-batches on the model at the same time.
        deadline_s: the longest one batch may take; what is unfinished then gets a 504.
    """

    micro_batch_size: Optional[int] = None
    micro_batch_strategy: str = "static"
    pool_size: int = field(default_factory=usable_cores)
    inference_workers: int = 1
    deadline_s: float = DEFAULT_DEADLINE_S

    def __post_init__(self):
        found = ConfigProblems()
        found.check(_check_int, "micro_batch_size", self.micro_batch_size, minimum=1, allow_none=True)
        if self.micro_batch_strategy not in sizing_names():
            found.lines.append(
                f"{SECTION}.micro_batch_strategy must be one of {', '.join(sizing_names())}, "
                f"got {self.micro_batch_strategy!r} (a strategy of your own: handlers.register_sizing)"
            )
        found.check(_check_int, "pool_size", self.pool_size, minimum=1)
        found.check(_check_int, "inference_workers", self.inference_workers, minimum=1)
        found.check(_check_number, "deadline_s", self.deadline_s, exclusive_minimum=0)
        found.raise_any()


@dataclass(frozen=True)
class ModelFiles:
    """Where the model is, relative to the model directory: ``model_file`` (a Python file with one
    ``nn.Module`` class) and ``serialized_file`` (its state_dict, or a TorchScript file). The
    server adapter fills them in (TorchServe: from the archive's manifest)."""

    model_file: Optional[str] = None
    serialized_file: Optional[str] = None


ENGINE_KEYS = ("micro_batch_size", "micro_batch_strategy", "pool_size", "inference_workers", "deadline_s")


def read_handler_settings(
    section: Optional[Mapping[str, Any]],
    option_defaults: Mapping[str, Any] = {},
    server_timeout_s: Optional[float] = None,
    server_timeout_name: str = "the server's timeout",
    check_options: Optional[Callable[[dict], None]] = None,
) -> tuple[EngineSettings, dict]:
    """Read the engine settings and a handler's own options from a ``handler:`` section; every
    problem of the section is reported at once.

    Args:
        section: the ``handler:`` mapping of the model config; may be None.
        option_defaults: the handler's own options and their defaults; a value read from the
            config must have the type of its default (an int is accepted for a float).
        server_timeout_s: how long the server waits for a batch (TorchServe's responseTimeout),
            if it has such a limit: the default deadline leaves it room to send the answers, and
            a deadline at or past it is refused.
        server_timeout_name: that limit's name in the server's config, for messages.
        check_options: the handler's own rules for its options (``MicroBatchHandler.check_options``),
            run on the options (a value of the wrong type replaced by its default) and reported
            with the section's other problems.

    Returns:
        ``(engine_settings, options)``, where ``options`` holds every key of
        ``option_defaults``, overridden by the config.

    Raises:
        ConfigError: naming the key, the rule and the bad value, one line per problem.
    """
    section = section or {}
    if not isinstance(section, Mapping):
        raise ConfigError(f"{SECTION} must be a mapping of settings, got {section!r}")
    found = ConfigProblems()
    names = sorted([*ENGINE_KEYS, *option_defaults])
    for key in sorted(set(section) - set(ENGINE_KEYS) - set(option_defaults), key=str):
        found.lines.append(f"{SECTION}.{key} is not a known setting; known settings: {', '.join(names)}"
                           f"{did_you_mean(key, names)}")

    engine_values = {key: section[key] for key in ENGINE_KEYS if key in section}
    if engine_values.get("micro_batch_size") == "whole":
        engine_values["micro_batch_size"] = None
    default_deadline = DEFAULT_DEADLINE_S
    if server_timeout_s is not None:
        default_deadline = min(DEFAULT_DEADLINE_S, DEADLINE_SHARE_OF_SERVER_TIMEOUT * server_timeout_s)
    engine_values.setdefault("deadline_s", default_deadline)
    settings = found.check(EngineSettings, **engine_values)
    if settings is not None and server_timeout_s is not None and settings.deadline_s >= server_timeout_s:
        found.lines.append(
            f"{SECTION}.deadline_s must be shorter than {server_timeout_name} ({server_timeout_s:g} s) "
            f"so that late requests get an answer before the server gives up on the worker, "
            f"got {settings.deadline_s!r}"
        )

    options = dict(option_defaults)
    for key, default in option_defaults.items():
        if key in section:
            typed = found.check(_typed_like, key, section[key], default)
            options[key] = default if typed is None and section[key] is not None else typed
    if check_options is not None:
        found.check(check_options, options)
    found.raise_any()
    return settings, options


def did_you_mean(name: str, known) -> str:
    """`` (did you mean 'batchSize'?)`` when ``name`` is a known name in another case or a near
    misspelling of one; else empty."""
    import difflib

    by_case = {k.lower(): k for k in known}
    match = by_case.get(str(name).lower()) or next(iter(difflib.get_close_matches(str(name), list(known), n=1, cutoff=0.8)), None)
    return f" (did you mean {match!r}?)" if match else ""


def check_positive_number(name: str, value: Any) -> float:
    """``value`` as a float when it is a number > 0; else a ConfigError naming ``name``."""
    _check_number(name, value, exclusive_minimum=0, prefix="")
    return float(value)


def _typed_like(key: str, value: Any, default: Any) -> Any:
    if default is None or isinstance(value, type(default)) and not (
        isinstance(value, bool) and not isinstance(default, bool)
    ):
        return value
    if isinstance(default, float) and _is_int(value):
        return float(value)
    raise ConfigError(
        f"{SECTION}.{key} must be of type {type(default).__name__} (like its default {default!r}), "
        f"got {value!r}"
    )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_int(key, value, *, minimum, allow_none=False, prefix=SECTION + "."):
    if value is None and allow_none:
        return
    if not _is_int(value) or value < minimum:
        extra = " (or 'whole' for the whole batch)" if allow_none else ""
        raise ConfigError(f"{prefix}{key} must be an integer >= {minimum}{extra}, got {value!r}")


def _check_number(key, value, *, exclusive_minimum, prefix=SECTION + "."):
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > exclusive_minimum:
        raise ConfigError(f"{prefix}{key} must be a number > {exclusive_minimum}, got {value!r}")
