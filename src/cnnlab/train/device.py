"""The speed settings of training that only pay off on some devices."""

from __future__ import annotations

import ctypes
import sys

import torch
import torch.nn as nn



def on_by_default(setting: bool | None, device: torch.device) -> bool:
    """bf16 autocast and channels-last help tensor cores; on a CPU they cost more than they give."""
    return device.type == "cuda" if setting is None else setting


def use_channels_last(setting: bool | None, device: torch.device) -> bool:
    """Channels-last memory layout: on CUDA by default; never on the CPU.

    On the CPU it is slower in fp32 here, and torch 2.14's CPU backward kernels crash (SIGSEGV) on
    channels-last ResNets narrower than 16 channels with batches of odd size, so it is refused there.
    """
    if device.type == "cpu":
        if setting:
            print("note: --channels-last is ignored on the CPU (it is for GPUs)", file=sys.stderr)
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
        import torch._inductor.config

        torch._inductor.config.layout_optimization = False
    return torch.compile(forward, mode=mode)


def compile_mode(compile: bool, cuda_graphs: bool, device: torch.device) -> str | None:
    """The ``torch.compile`` mode for the training step, or None to run eagerly."""
    if cuda_graphs and device.type != "cuda":
        print("note: --cuda-graphs is ignored off CUDA (the step is compiled without them)", file=sys.stderr)
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
