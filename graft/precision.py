"""How a model's forward passes run when it scores texts: `fp32`, `bf16` (autocast), `int8`
(torch dynamic quantization of every `nn.Linear`: int8 weights per output channel, activations
quantized per call; CPU only) or `bf16_compiled` (a bf16 copy of the weights, compiled by
torch.compile's inductor with freezing: weights folded in as constants, oneDNN/AMX kernels on the
CPU; a compile costs seconds to tens of seconds per process, so it pays on large workloads only).
Standard library and torch only: register logs this file beside
the serving code (registry.SERVING_CODE_PATHS), so the served model runs its forward passes in
the mode evaluate scored it in, graft installed or not. Which mode a run uses is
`model.inference` (graft.inference chooses it when `auto`)."""

from __future__ import annotations

import contextlib
import copy
import os
import shutil
import warnings
import weakref

import torch

COMPILED = "bf16_compiled"
MODES = ("fp32", "bf16", "int8", COMPILED)
BF16_MODES = ("bf16", COMPILED)  # the modes whose arithmetic is bf16 (native on AMX / AVX512-BF16 CPUs)
_MARK = "_graft_inference"
# model -> its compiled copy: a process compiles each model once, however often it scores
_COMPILED_COPIES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 dot products natively (AVX512-BF16 or AMX), read from
    /proc/cpuinfo (Linux); False where that cannot be told."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def cpp_compiler() -> str | None:
    """The C++ compiler torch.compile's inductor would build CPU kernels with ($CXX, g++, c++ or
    clang++ on PATH), or None."""
    return next((found for name in (os.environ.get("CXX"), "g++", "c++", "clang++")
                 if name and (found := shutil.which(name))), None)


def check(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"inference mode {mode!r}: expected one of {', '.join(MODES)}")
    return mode


def prepare(model: torch.nn.Module, mode: str) -> torch.nn.Module:
    """The model as `mode` runs it: for int8 a quantized copy on the CPU; for bf16_compiled a
    compiled bf16 copy (`compiled`); for fp32 and bf16 the model itself. The original is left as
    it is; a model this function already prepared comes back as it is."""
    if check(mode) == COMPILED:
        return compiled(model)
    if mode != "int8" or getattr(model, _MARK, None) == "int8":
        return model
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    with warnings.catch_warnings():  # torch.ao's deprecation notices
        warnings.simplefilter("ignore")
        # every Linear but those the model keeps in fp32 (`fp32_modules`: a head served in fp32)
        keep = tuple(getattr(model, "fp32_modules", ()))
        names = {name: per_channel_dynamic_qconfig for name, module in model.named_modules()
                 if isinstance(module, torch.nn.Linear) and not any(name == k or name.startswith(f"{k}.") for k in keep)}
        quantized = quantize_dynamic(copy.deepcopy(model).cpu().eval(), names, dtype=torch.qint8)
    state: dict = {}
    for parent in list(quantized.modules()):
        for name, child in list(parent.named_children()):
            if type(child).__name__ == "Linear" and type(child).__module__.startswith("torch.ao.nn.quantized"):
                setattr(parent, name, _PerSequence(child, state))

    def remember_mask(_module, args, kwargs):  # which tokens of each sequence are real, for _PerSequence
        mask = kwargs.get("attention_mask")
        state["mask"] = None if mask is None else mask.bool()

    quantized.register_forward_pre_hook(remember_mask, with_kwargs=True)
    setattr(quantized, _MARK, "int8")
    return quantized


def compiled(model: torch.nn.Module) -> torch.nn.Module:
    """A bf16 copy of `model` (the modules it lists in `fp32_modules`, a probe's head, stay fp32),
    compiled with inductor's freezing (weights become constants of the graph, so the copy must not
    be trained) and dynamic shapes (one graph for every batch and length). Cached per model: the
    same object again for the same model. Compiling happens at the first call."""
    if getattr(model, _MARK, None) == COMPILED:
        return model
    if model in _COMPILED_COPIES:
        return _COMPILED_COPIES[model]
    on_cpu = all(p.device.type == "cpu" for p in model.parameters())
    if on_cpu and cpp_compiler() is None:  # say so now, not as a build failure at the first call
        raise RuntimeError(f"inference mode {COMPILED}: torch.compile needs a C++ compiler on the CPU "
                           "(g++, c++, clang++ or $CXX on PATH); none found. Install one, or score in bf16")
    import torch._inductor.config as inductor_config

    # inductor freezes only graphs compiled with grad disabled (compile_fx: `config.freezing and not
    # torch.is_grad_enabled()`), so train.compile's training graphs in the same process are not
    inductor_config.freezing = True
    copied = copy.deepcopy(model).eval().requires_grad_(False).to(torch.bfloat16)
    for name in getattr(model, "fp32_modules", ()):
        copied.get_submodule(name).float()
    result = torch.compile(copied, dynamic=True)
    setattr(result, _MARK, COMPILED)
    _COMPILED_COPIES[model] = result
    return result


class _PerSequence(torch.nn.Module):
    """A dynamically quantized Linear whose activations are quantized per sequence, over that
    sequence's real tokens only (torch's own scale spans the whole batch, padding included, so a
    text's result would depend on the texts batched with it: evaluate's length-sorted batches
    and the server's would disagree). Padding positions get zeros, which attention masks out."""

    def __init__(self, linear: torch.nn.Module, state: dict) -> None:
        super().__init__()
        self.linear, self.state = linear, state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:  # (batch, features): the pooler, a head
            return torch.cat([self.linear(row) for row in x.split(1)]) if len(x) else self.linear(x)
        mask = self.state.get("mask")
        if x.dim() != 3 or mask is None or mask.shape != x.shape[:2]:
            return torch.stack([self.linear(seq) for seq in x]) if x.dim() == 3 else self.linear(x)
        out = x.new_zeros(*x.shape[:-1], self.linear.out_features)
        for b in range(x.shape[0]):
            keep = mask[b]
            out[b, keep] = self.linear(x[b, keep])
        return out


def device_for(mode: str, device: torch.device) -> torch.device:
    """Where `mode` runs: int8 on the CPU, the others where asked."""
    return torch.device("cpu") if check(mode) == "int8" else device


def context(device: torch.device, mode: str) -> contextlib.AbstractContextManager:
    """The forward passes' context for `mode`: bf16 autocast, or nothing (bf16_compiled's weights
    are bf16 themselves)."""
    if check(mode) == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
