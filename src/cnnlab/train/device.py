"""The speed settings of training that only pay off on some devices."""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import platform
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from cnnlab.core.errors import UserError

log = logging.getLogger(__name__)


def on_by_default(setting: bool | None, device: torch.device) -> bool:
    """Channels-last helps tensor cores; on a CPU it costs more than it gives."""
    return device.type == "cuda" if setting is None else setting


# x86 CPU flags of instructions that compute in bf16; without them torch emulates bf16 in fp32 and
# converts every tensor back and forth (training resnet18-seed with bf16 autocast on an AVX2-only
# AMD EPYC: 0.26 images/s against 4.9 in fp32; 3.8× faster than fp32 on an AVX-512 bf16 EPYC).
BF16_FLAGS = ("avx512_bf16", "amx_bf16")
# Overrides the detection: for CPUs it misjudges, and for tests that need either answer on any machine.
BF16_ENV = "CNNLAB_CPU_BF16"


@functools.cache
def cpu_info() -> tuple[str, frozenset[str]]:
    """The CPU's model name and flags from /proc/cpuinfo (Linux); elsewhere the flags torch can tell."""
    model, flags = "", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and not model:
                model = value.strip()
            elif key.strip() == "flags":
                flags.update(value.split())
    except OSError:
        pass
    if not flags:  # not Linux: torch's own (private) probes, where this torch has them
        probes = {"avx512_bf16": "_is_avx512_bf16_supported", "amx_bf16": "_is_amx_tile_supported"}
        flags = {flag for flag, probe in probes.items() if getattr(torch.cpu, probe, lambda: False)()}
    return model or platform.processor() or "unknown", frozenset(flags)


def bf16_is_native(capability: str, flags: frozenset[str] | set[str]) -> bool:
    """Whether torch runs bf16 natively on a CPU with torch kernel ``capability`` and ``flags``.

    Both are needed: the instructions, and torch's AVX-512 kernels that use them (a CPU with bf16
    instructions still gets AVX2 kernels when ATEN_CPU_CAPABILITY=avx2 caps them).
    """
    return capability.startswith("AVX512") and any(f in flags for f in BF16_FLAGS)


def cpu_bf16() -> dict[str, Any]:
    """What this CPU offers bf16 autocast: torch's kernel capability, bf16 flags, native or not, model."""
    model, flags = cpu_info()
    capability = torch.backends.cpu.get_cpu_capability()
    info = {"model": model, "capability": capability, "bf16_flags": [f for f in BF16_FLAGS if f in flags]}
    forced = os.environ.get(BF16_ENV)
    if forced is None:
        return {**info, "bf16_native": bf16_is_native(capability, flags)}
    if forced not in ("0", "1"):
        raise UserError(f"{BF16_ENV} must be 1 (this CPU runs bf16 natively) or 0 (it does not), got {forced!r}")
    return {**info, "bf16_native": forced == "1", "set_by": f"{BF16_ENV}={forced}"}


def amp_choice(setting: bool | str | None, device: torch.device) -> dict[str, Any]:
    """Whether training uses bf16 autocast, and why: what a run's config.json records under "amp".

    ``setting``: None (on for CUDA only), True (on where bf16 is native: CUDA, or a CPU with bf16
    instructions), False (off) or "force" (on, even on a CPU that would emulate bf16).
    """
    asked = {None: "default", True: "on", False: "off", "force": "force"}[setting]
    if setting is False:
        return {"asked": asked, "used": "fp32", "why": "turned off"}
    if setting is None:
        used = "bf16" if device.type == "cuda" else "fp32"
        return {"asked": asked, "used": used, "why": "bf16 autocast is on by default for CUDA only"}
    if device.type != "cpu":
        return {"asked": asked, "used": "bf16", "why": "asked for"}
    cpu = cpu_bf16()
    native = "runs bf16 natively" if cpu["bf16_native"] else "has no native bf16"
    about = f"this CPU ({cpu['model']}, torch capability {cpu['capability']}) {native}"
    if "set_by" in cpu:
        about += f" (as {cpu['set_by']} says)"
    if setting == "force":
        return {"asked": asked, "used": "bf16", "why": f"forced; {about}", "cpu": cpu}
    if cpu["bf16_native"]:
        return {"asked": asked, "used": "bf16", "why": f"asked for; {about}", "cpu": cpu}
    return {"asked": asked, "used": "fp32", "cpu": cpu,
            "why": f"{about}, where bf16 autocast is many times slower than fp32; --amp force uses it anyway"}


def use_amp(setting: bool | str | None, device: torch.device) -> bool:
    """Whether to train with bf16 autocast; says so when ``--amp`` was asked for and is not used."""
    choice = amp_choice(setting, device)
    if setting is True and choice["used"] == "fp32":
        log.warning(f"note: `amp` is ignored, training in fp32: {choice['why']}")
    return choice["used"] == "bf16"


def use_channels_last(setting: bool | None, device: torch.device) -> bool:
    """Channels-last memory layout: on CUDA by default; never on the CPU.

    On the CPU it is slower in fp32 here, and torch 2.14's CPU backward kernels crash (SIGSEGV) on
    channels-last ResNets narrower than 16 channels with batches of odd size, so it is refused there.
    """
    if device.type == "cpu":
        if setting:
            log.warning("note: `channels_last` is ignored on the CPU (it is for GPUs)")
        return False
    return on_by_default(setting, device)


def compiled(forward: nn.Module, compile: bool, cuda_graphs: bool, device: torch.device) -> nn.Module:
    """``forward`` through ``torch.compile`` when asked (``--compile``, or ``--cuda-graphs`` which implies it).

    CUDA graphs (mode ``reduce-overhead``) replay a whole compiled step with one launch: they pay
    off when a step is many small kernels, e.g. small images or small batches on a fast GPU. The
    step's shapes must stay fixed; the last, smaller batch of an epoch gets a graph of its own.
    """
    mode = compile_mode(compile, cuda_graphs, device)
    if mode is None:
        return forward
    if device.type == "cpu":
        # Inductor would switch convolutions to channels-last on the CPU, where torch 2.14's kernels
        # corrupt the heap for models narrower than 16 channels (the bug use_channels_last avoids).
        import torch._inductor.config  # only with --compile: it takes seconds to import

        torch._inductor.config.layout_optimization = False
    return torch.compile(forward, mode=mode)


def compile_mode(compile: bool, cuda_graphs: bool, device: torch.device) -> str | None:
    """The ``torch.compile`` mode for the training step, or None to run eagerly."""
    if cuda_graphs and device.type != "cuda":
        log.warning("note: `cuda_graphs` is ignored off CUDA (the step is compiled without them)")
        return "default"
    if cuda_graphs:
        return "reduce-overhead"
    return "default" if compile else None


def keep_freed_memory() -> None:
    """Let glibc reuse freed blocks instead of unmapping them, for CPU training on Linux.

    By default glibc returns every freed block above 32 MiB to the system, so each new batch and
    each large activation is faulted in page by page again; on a 2-core machine that was most of
    the input pipeline's time (normalised 224 px batches of 64: 62 → 153 a second). A training
    process keeps its peak memory anyway. Elsewhere this does nothing.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (e.g. musl)
        return
    m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's malloc.h
    # Blocks up to 1 GiB come from the heap and stay there when freed; fixing the thresholds also
    # turns off glibc's own adaptation of them.
    libc.mallopt(m_mmap_threshold, 2**30)
    libc.mallopt(m_trim_threshold, 2**31)
