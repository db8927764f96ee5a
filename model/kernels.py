"""Which implementation each fused-kernel piece of the model runs: resolved here, for the whole model.

One switch, the environment variable MAMBAMIA_KERNELS, read once (at the first kernel decision):
    auto       mamba_ssm's kernels for CUDA tensors when they import, the PyTorch paths elsewhere
               (CPU, float64, mamba_ssm missing). The default.
    reference  the PyTorch paths everywhere.
    fused      mamba_ssm's kernels on whatever device the tensors are on (on CPU that takes Triton's
               interpreter, TRITON_INTERPRET=1: the kernel tests do this); a one-line error saying
               what is missing when they cannot run.

The pieces: the SSD scan (`mamba_chunk_scan_combined`, used by model.ssd.chunk_scan), the gated
RMSNorm (`layernorm_gated.rmsnorm_fn`, used by model.mixer.RMSNormGated) and the mixer's fused
conv1d + SSD + gated norm (`mamba_split_conv1d_scan_combined`, which also needs causal_conv1d's
CUDA op; without it the mixer runs a PyTorch conv1d followed by the other two pieces). Each piece
logs once which path it takes and why. `use(mode)` overrides the switch (tests, benchmarks).
"""
from __future__ import annotations

import contextlib
import logging
import os
from typing import Callable, Iterator

import torch

logger = logging.getLogger(__name__)

ENV_VAR = "MAMBAMIA_KERNELS"
MODES = ("auto", "reference", "fused")

SSD_SCAN = "SSD scan"
GATED_NORM = "gated RMSNorm"
SPLIT_CONV1D = "mixer conv1d + SSD + gated norm"
NO_CAUSAL_CONV1D = "causal_conv1d, which is not installed"

_mode: str | None = None
_loaded: dict[str, tuple[Callable | None, str]] = {}
_logged: set[tuple[str, str]] = set()


def mode() -> str:
    """The kernel mode: MAMBAMIA_KERNELS (default "auto"), read and checked once."""
    global _mode
    if _mode is None:
        value = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
        if value not in MODES:
            raise ValueError(f"{ENV_VAR}={value!r}: expected one of {', '.join(MODES)}")
        _mode = value
    return _mode


@contextlib.contextmanager
def use(value: str) -> Iterator[None]:
    """Run a block with kernel mode `value` whatever the environment says (tests, benchmarks)."""
    global _mode
    if value not in MODES:
        raise ValueError(f"kernels.use: expected one of {', '.join(MODES)}, got {value!r}")
    previous, _mode = _mode, value
    try:
        yield
    finally:
        _mode = previous


def _load(piece: str) -> tuple[Callable | None, str]:
    """(the kernel, "") or (None, what is missing); the import is tried once per piece."""
    if piece not in _loaded:
        try:
            # mamba_ssm's package __init__ imports its CUDA extension: on a CPU machine or with a
            # Triton-only install this raises, unless the package was registered bare first
            # (tests/support/triton_cpu.py, the GPU check).
            if piece == GATED_NORM:
                from mamba_ssm.ops.triton.layernorm_gated import rmsnorm_fn as kernel
            else:
                from mamba_ssm.ops.triton import ssd_combined
                kernel = (ssd_combined.mamba_chunk_scan_combined if piece == SSD_SCAN
                          else ssd_combined.mamba_split_conv1d_scan_combined)
        except (ImportError, OSError, RuntimeError, AttributeError) as err:
            _loaded[piece] = (None, f"mamba_ssm's Triton kernels, which do not import ({type(err).__name__}: {err})")
        else:
            conv_missing = piece == SPLIT_CONV1D and ssd_combined.causal_conv1d_fwd_function is None
            _loaded[piece] = (None, NO_CAUSAL_CONV1D) if conv_missing else (kernel, "")
    return _loaded[piece]


def _log_once(piece: str, path: str) -> None:
    if (piece, path) not in _logged:
        _logged.add((piece, path))
        logger.info("%s: %s (%s=%s)", piece, path, ENV_VAR, mode())


def kernel_for(piece: str, tensor: torch.Tensor) -> Callable | None:
    """The fused kernel `piece` should run on `tensor`, or None for the PyTorch path (see module doc).

    Raises RuntimeError (one line, naming what is missing) in "fused" mode when the kernel cannot
    run. The mixer asks for SPLIT_CONV1D through `split_conv1d_kernel`, which may fall back.
    """
    current = mode()
    if current == "reference":
        _log_once(piece, "PyTorch path")
        return None
    kernel, missing = _load(piece)
    runnable = tensor.dtype in (torch.float32, torch.float16, torch.bfloat16)
    if current == "auto":
        if kernel is not None and tensor.is_cuda and runnable:
            _log_once(piece, "mamba_ssm fused kernel on CUDA")
            return kernel
        _log_once(piece, "PyTorch path" + (f" (needs {missing})" if missing else " off CUDA"))
        return None
    if kernel is None:
        raise RuntimeError(f"{ENV_VAR}=fused: the {piece} needs {missing}")
    if not runnable:
        raise RuntimeError(f"{ENV_VAR}=fused: the {piece} kernel takes float32/float16/bfloat16 "
                           f"tensors, got {tensor.dtype} (use auto or reference for float64)")
    _log_once(piece, f"mamba_ssm fused kernel on {tensor.device.type}")
    return kernel


def split_conv1d_kernel(tensor: torch.Tensor) -> Callable | None:
    """The mixer's fully fused direction, or None: then conv1d runs in PyTorch and the SSD scan and
    gated norm ask for their own kernels. Unlike the other pieces, "fused" mode accepts its absence
    when only causal_conv1d is missing (mamba_ssm has no conv kernel of its own), and logs it."""
    if mode() == "fused" and _load(SPLIT_CONV1D)[1] == NO_CAUSAL_CONV1D:
        _log_once(SPLIT_CONV1D, "causal_conv1d is not installed: PyTorch conv1d, then the fused "
                                "SSD scan and gated norm")
        return None
    return kernel_for(SPLIT_CONV1D, tensor)


def reset() -> None:
    """Forget the mode, the imports and what was logged (tests that install or stub kernels)."""
    global _mode
    _mode = None
    _loaded.clear()
    _logged.clear()
