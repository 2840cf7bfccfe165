"""Regressions (issue 29, part 2): a torch.AcceleratorError is sticky by its CUDA error code, not
by its type; any AcceleratorError used to end the worker, per-launch errors included."""

import pytest
import torch

from handlers.core.accelerator_errors import STICKY_CUDA_ERRORS, breaks_device


class AcceleratorError(RuntimeError):
    """torch >= 2.8's error, as torch raises it: the CUDA error code in ``error_code``."""

    def __init__(self, message, error_code=None):
        super().__init__(message)
        if error_code is not None:
            self.error_code = error_code


@pytest.mark.parametrize("code, message", [
    (700, "CUDA error: an illegal memory access was encountered"),
    (710, "CUDA error: device-side assert triggered"),
    (719, "CUDA error: unspecified launch failure"),
    (716, "CUDA error: misaligned address"),
    (715, "CUDA error: an illegal instruction was encountered"),
    (714, "CUDA error: hardware stack error"),
    (718, "CUDA error: invalid program counter"),
    (214, "CUDA error: uncorrectable ECC error encountered"),
    (702, "CUDA error: the launch timed out and was terminated"),
])
def test_a_sticky_cuda_error_breaks_the_device_by_code_and_by_message(code, message):
    assert code in STICKY_CUDA_ERRORS
    assert breaks_device(AcceleratorError(message, code))
    assert breaks_device(AcceleratorError(message))  # no code: the message decides
    assert breaks_device(RuntimeError(message))  # torch < 2.8


@pytest.mark.parametrize("code, message", [
    (701, "CUDA error: too many resources requested for launch"),  # cudaErrorLaunchOutOfResources
    (9, "CUDA error: invalid configuration argument"),  # cudaErrorInvalidConfiguration
    (98, "CUDA error: invalid device function"),
    (2, "CUDA error: out of memory"),
])
def test_a_per_launch_accelerator_error_leaves_the_device_usable(code, message):
    assert not breaks_device(AcceleratorError(message, code))
    assert not breaks_device(AcceleratorError(message))
    assert not breaks_device(RuntimeError(message))


def test_the_code_wins_over_the_message():
    """A per-launch code whose message happens to read like a sticky one (a wrapper's text)."""
    assert not breaks_device(AcceleratorError("CUDA error: an illegal memory access (retried)", 701))
    assert breaks_device(AcceleratorError("CUDA error: something new", 700))


def test_errors_that_are_not_the_accelerators_never_break_it():
    assert not breaks_device(ValueError("an illegal memory access"))  # not a RuntimeError
    assert not breaks_device(RuntimeError("an illegal value"))  # not a CUDA error
    assert not breaks_device(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))


def test_torchs_own_accelerator_error_is_read_the_same_way():
    error = torch.AcceleratorError("CUDA error: invalid configuration argument")
    assert not breaks_device(error)
    error.error_code = 700
    assert breaks_device(error)
