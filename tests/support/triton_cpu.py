"""Run mamba_ssm's Triton kernels on CPU tensors under Triton's interpreter (test processes only).

`enable()` must run before triton or mamba_ssm is imported (it sets TRITON_INTERPRET=1) and patches
this process only, which is why the kernel tests run it in a process of their own
(`tests/kernel_worker.py`):

1. `mamba_ssm` is registered as a bare package whose `__path__` is the installed folder, so its
   `__init__` (which imports the CUDA extension `selective_scan_cuda` and huggingface_hub) never
   runs; `mamba_ssm.ops.triton.*` then import normally.
2. Every kernel launch is wrapped in `torch.cuda.device(x.device.index)`, which fails for a CPU
   tensor (index None): it becomes a null context. Backward wrappers size their grids from
   `torch.cuda.get_device_properties(device).multi_processor_count`: a CPU device answers 8.
3. The interpreter has no benchmarker ("0 active drivers"), so autotuning keeps one config: the one
   with the largest product of BLOCK_SIZE_* (fewest interpreted programs, the fastest here).
4. Optionally (`register_causal_conv1d_standin`), causal_conv1d's CUDA forward/backward ops, which
   mamba_split_conv1d_scan_combined calls, are replaced by a PyTorch depthwise conv with the same
   signature, so the fused split-conv1d path runs with everything else real.

Install what it needs: `pip install triton` and
`MAMBA_SKIP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE pip install --no-build-isolation --no-deps mamba-ssm`
(plus einops).
"""
from __future__ import annotations

import contextlib
import importlib.util
import math
import os
import sys
import types

INSTALL_HINT = ("pip install triton einops && MAMBA_SKIP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE "
                "pip install --no-build-isolation --no-deps mamba-ssm")


def missing() -> str | None:
    """What is missing for the interpreter path (None when all is there), found without importing."""
    for name in ("triton", "mamba_ssm", "einops"):
        if importlib.util.find_spec(name) is None:
            return f"{name} is not installed ({INSTALL_HINT})"
    return None


def enable() -> None:
    """Set up this process for mamba_ssm's kernels on CPU (see the module doc); idempotent."""
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("triton_cpu.enable: triton was imported before TRITON_INTERPRET=1 was set; "
                           "call enable() first, in a fresh process")
    os.environ["TRITON_INTERPRET"] = "1"
    register_bare_mamba_ssm()
    _patch_torch_cuda()
    _patch_autotuner()


def register_bare_mamba_ssm() -> None:
    """Make `mamba_ssm.ops.triton.*` importable without running mamba_ssm's `__init__`, which
    imports the CUDA extension a Triton-only install (built with MAMBA_SKIP_CUDA_BUILD) lacks;
    also what the GPU check does with the wheel it carries."""
    if "mamba_ssm" not in sys.modules:
        spec = importlib.util.find_spec("mamba_ssm")
        package = types.ModuleType("mamba_ssm")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["mamba_ssm"] = package


def _patch_torch_cuda() -> None:
    import torch

    if getattr(torch.cuda.device, "_triton_cpu", False):
        return
    real_properties = torch.cuda.get_device_properties

    def device(index):
        return contextlib.nullcontext()

    def get_device_properties(dev=None):
        if dev is None or torch.device(dev).type == "cpu":
            return types.SimpleNamespace(multi_processor_count=8, name="cpu (triton interpreter)")
        return real_properties(dev)

    device._triton_cpu = True
    torch.cuda.device = device
    torch.cuda.get_device_properties = get_device_properties


def _patch_autotuner() -> None:
    from triton.runtime import autotuner

    if getattr(autotuner.Autotuner.prune_configs, "_triton_cpu", False):
        return

    def block_product(config) -> int:
        return math.prod(v for k, v in config.kwargs.items() if k.startswith("BLOCK_SIZE"))

    def prune_configs(self, kwargs):
        return [max(self.configs, key=block_product)]

    prune_configs._triton_cpu = True
    autotuner.Autotuner.prune_configs = prune_configs


def causal_conv1d_fwd(x, weight, bias, seq_idx, initial_states, final_states_out, silu_activation):
    """causal_conv1d's forward op: x [b, d, s], weight [d, w] -> [b, d, s], by a PyTorch conv."""
    import torch.nn.functional as F

    if seq_idx is not None or initial_states is not None or final_states_out is not None:
        raise NotImplementedError("causal_conv1d stand-in: seq_idx and conv states are not supported")
    width = weight.shape[-1]
    out = F.conv1d(F.pad(x, (width - 1, 0)), weight.unsqueeze(1), bias, groups=weight.shape[0])
    return F.silu(out) if silu_activation else out


def causal_conv1d_bwd(x, weight, bias, dout, seq_idx, initial_states, dfinal_states, dx,
                      return_dinitial_states, silu_activation):
    """causal_conv1d's backward op: (dx, dweight, dbias, dinitial_states), by autograd of the
    forward above; like the CUDA op it writes dx into the buffer given."""
    import torch

    if return_dinitial_states or dfinal_states is not None:
        raise NotImplementedError("causal_conv1d stand-in: conv states are not supported")
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_() for t in (x, weight)]
        bias_leaf = bias.detach().requires_grad_() if bias is not None else None
        out = causal_conv1d_fwd(*leaves, bias_leaf, seq_idx, None, None, silu_activation)
        inputs = leaves + ([bias_leaf] if bias_leaf is not None else [])
        grads = torch.autograd.grad(out, inputs, dout)
    dx_new, dweight = grads[0], grads[1]
    if dx is not None:
        dx.copy_(dx_new)
        dx_new = dx
    return dx_new, dweight, grads[2] if bias is not None else None, None


def register_causal_conv1d_standin() -> None:
    """Make `causal_conv1d` importable with the stand-in ops (before mamba_ssm's ssd_combined is
    imported), and patch them in if ssd_combined was already imported."""
    package = types.ModuleType("causal_conv1d")
    package.__path__ = []
    package.causal_conv1d_fn = None
    cpp = types.ModuleType("causal_conv1d.cpp_functions")
    cpp.causal_conv1d_fwd_function = causal_conv1d_fwd
    cpp.causal_conv1d_bwd_function = causal_conv1d_bwd
    cpp.causal_conv1d_update_function = None
    package.cpp_functions = cpp
    sys.modules["causal_conv1d"] = package
    sys.modules["causal_conv1d.cpp_functions"] = cpp
    combined = sys.modules.get("mamba_ssm.ops.triton.ssd_combined")
    if combined is not None:
        combined.causal_conv1d_fwd_function = causal_conv1d_fwd
        combined.causal_conv1d_bwd_function = causal_conv1d_bwd
