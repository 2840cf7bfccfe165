"""What an archiver config may say for each server, checked without starting one: TorchServe's
model-config keys (``responseTimeout`` and the ``handler:`` section it bounds) and the
``ray_serve:`` section. ``python -m handlers.archive --check`` and both server adapters read a
config through these; neither server is imported here.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

from handlers.engine.settings import SECTION, check_positive_number, read_handler_settings

DEFAULT_RESPONSE_TIMEOUT_S = 120.0  # TorchServe's default responseTimeout

RAY_SECTION = "ray_serve"
# Keys of the archiver config's ray_serve: section, passed to Ray Serve as they are.
DEPLOYMENT_KEYS = ("num_replicas", "autoscaling_config", "ray_actor_options", "max_ongoing_requests",
                   "health_check_period_s", "health_check_timeout_s")
OWN_KEYS = ("max_concurrent_batches", "max_request_bytes")


# -- TorchServe ----------------------------------------------------------------------------------


def response_timeout(model_config: Mapping[str, Any]) -> float:
    """TorchServe's ``responseTimeout`` from a model config (its default when absent)."""
    return check_positive_number("responseTimeout", model_config.get("responseTimeout", DEFAULT_RESPONSE_TIMEOUT_S))


def read_settings(model_config: Optional[Mapping[str, Any]], option_defaults: Mapping[str, Any] = {}) -> tuple:
    """The engine settings and a handler's own options from a TorchServe model config (its
    ``handler:`` section, with the deadline kept inside ``responseTimeout``)."""
    model_config = model_config or {}
    return read_handler_settings(model_config.get(SECTION), option_defaults, response_timeout(model_config),
                                 "responseTimeout")


def check_model_config(model_config: Optional[Mapping[str, Any]], handler_class) -> tuple:
    """Everything start-up checks of a model config, without starting: the engine settings and
    ``handler_class``'s options with its own rules. Raises ConfigError."""
    model_config = model_config or {}
    return handler_class.read_config(model_config.get(SECTION), response_timeout(model_config), "responseTimeout")


# -- Ray Serve -----------------------------------------------------------------------------------


def check_ray_section(section: Any) -> dict:
    """The ``ray_serve:`` section of an archiver config, checked: a ValueError names the key (one
    line per wrong key, all at once)."""
    section = section or {}
    if not isinstance(section, Mapping):
        raise ValueError(f"{RAY_SECTION} must be a mapping, got {section!r}")
    found = []
    for key, value in section.items():
        if key not in DEPLOYMENT_KEYS + OWN_KEYS:
            found.append(f"{RAY_SECTION}.{key} is not a known setting; known: {', '.join(DEPLOYMENT_KEYS + OWN_KEYS)}")
        elif key in ("max_concurrent_batches", "max_request_bytes", "num_replicas", "max_ongoing_requests") and (
            not isinstance(value, int) or isinstance(value, bool) or value < 1
        ):
            found.append(f"{RAY_SECTION}.{key} must be an integer >= 1, got {value!r}")
    if found:
        raise ValueError("\n".join(found))
    return dict(section)
