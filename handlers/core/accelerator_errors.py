"""Which accelerator errors leave the device unusable for the rest of the process ("sticky"), so
that the worker must be replaced, and which fail one launch only. No torch import: the rule reads
the exception's type name, its CUDA error code and its message, and is tested on CPU.
"""

from __future__ import annotations

# CUDA runtime errors after which "any further CUDA work will return the same error; to continue
# using CUDA, the process must be terminated and relaunched" (cudaError_t in the CUDA runtime
# API docs), and the uncorrectable hardware faults. HIP numbers these errors alike.
STICKY_CUDA_ERRORS = {
    214: "cudaErrorECCUncorrectable",
    220: "cudaErrorNvlinkUncorrectable",
    700: "cudaErrorIllegalAddress",
    702: "cudaErrorLaunchTimeout",
    710: "cudaErrorAssert",
    714: "cudaErrorHardwareStackError",
    715: "cudaErrorIllegalInstruction",
    716: "cudaErrorMisalignedAddress",
    717: "cudaErrorInvalidAddressSpace",
    718: "cudaErrorInvalidPc",
    719: "cudaErrorLaunchFailure",
    911: "cudaErrorExternalDevice",
    999: "cudaErrorUnknown",  # how the driver reports an Xid fault it cannot name
}

# The same errors by message, for an error that carries no code (torch < 2.8 raised a plain
# RuntimeError; a wrapped error keeps only the text).
STICKY_MESSAGES = ("device-side assert", "illegal memory access", "unspecified launch failure",
                   "misaligned address", "illegal instruction", "an illegal", "uncorrectable ecc",
                   "uncorrectable nvlink", "hardware stack error", "invalid program counter",
                   "cuda error: unknown error", "launch timed out")


def breaks_device(exc: BaseException) -> bool:
    """True for an accelerator error after which the device cannot be used in this process.

    torch >= 2.8 raises ``torch.AcceleratorError`` with the CUDA error code in ``error_code``: the
    code decides (a per-launch error such as cudaErrorLaunchOutOfResources, 701, or an invalid
    configuration, 9, leaves the device usable). Without a code, the message decides.

    >>> breaks_device(RuntimeError("CUDA error: an illegal memory access was encountered"))
    True
    """
    code = getattr(exc, "error_code", None)
    if type(exc).__name__ == "AcceleratorError" and isinstance(code, int) and not isinstance(code, bool):
        return code in STICKY_CUDA_ERRORS
    text = str(exc).lower()
    if "out of memory" in text:
        return False
    return isinstance(exc, RuntimeError) and ("cuda error" in text or "cudnn_status_execution_failed" in text) and any(
        message in text for message in STICKY_MESSAGES)
