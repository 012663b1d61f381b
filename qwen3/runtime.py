"""What every command needs from the machine it runs on: devices, dtypes, speed limits, RNG, signals.

Training, evaluation, generation and serving all resolve a `--device` value, pick an autocast dtype,
and (training) measure against a peak FLOP rate; these helpers live here so that none of those
modules has to import another for them.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import math
import os
import platform
import random
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist

from qwen3.errors import UserError

T = TypeVar("T")

# Dense bfloat16/float16 tensor-core peaks (FLOP/s, per GPU) from the vendors' data sheets (the
# sparse figures halved). A key matches when all its words are words of torch.cuda.get_device_name()
# (split at spaces and hyphens, any case), and the longest matching key wins: "NVIDIA H100 NVL" is an
# H100 NVL, not an SXM H100. Other devices get a matmul probe.
GPU_PEAK_FLOPS = {
    ("H100",): 989e12, ("H100", "PCIe"): 756e12, ("H100", "NVL"): 835e12,
    ("H200",): 989e12, ("H200", "NVL"): 835e12, ("GH200",): 989e12, ("H20",): 148e12,
    ("B200",): 2250e12, ("A100",): 312e12, ("A800",): 312e12, ("L40S",): 362e12, ("L40",): 181e12,
    ("L4",): 121e12, ("A10",): 125e12, ("RTX", "4090"): 165e12, ("RTX", "3090"): 71e12,
    ("V100",): 125e12, ("T4",): 65e12,
}
# Waiting for rank 0 to build the token store: a large corpus takes far longer than the default
# collective timeout (10 minutes under NCCL), so that one wait has its own.
PREPARATION_TIMEOUT = datetime.timedelta(hours=24)


def resolve_device(device: str) -> torch.device:
    """The device a --device value names: "auto" is CUDA when available, else Apple silicon's GPU
    (MPS), else the CPU."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if torch.backends.mps.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        resolved = None
    if resolved is None or resolved.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"unknown device {device!r} (use auto, cpu, cuda, cuda:N or mps)")
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {device!r} requested but CUDA is not available")
    if resolved.type == "mps" and not torch.backends.mps.is_available():
        raise UserError("device 'mps' requested but this machine has no MPS (Apple silicon, macOS 12.3 or later, "
                        "and a PyTorch built with MPS)")
    return resolved


def native_bfloat16(device: torch.device | str) -> bool:
    """Whether bfloat16 matmuls run at full speed on `device`.

    True on GPUs with bfloat16 tensor cores (Ampere and later; a V100 or T4 only emulates it), on
    Apple silicon's GPU from macOS 14 (MPS has bfloat16 kernels from then on) and on CPUs with
    AVX512-BF16 or AMX. Elsewhere (e.g. AVX2-only CPUs) oneDNN emulates them: measured 0.7 GFLOP/s
    in bfloat16 against 143 GFLOP/s in float32 on a 2-core EPYC.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return _cuda_native_bfloat16(device.index if device.index is not None else torch.cuda.current_device())
    if device.type == "mps":
        return torch.backends.mps.is_macos_or_newer(14, 0)
    return device.type != "cpu" or _cpu_native_bfloat16()


@functools.cache
def _cuda_native_bfloat16(index: int) -> bool:
    with torch.cuda.device(index):
        return torch.cuda.is_bf16_supported(including_emulation=False)


@functools.cache
def _cpu_native_bfloat16() -> bool:
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def peak_flops(device: torch.device, dtype: torch.dtype, repeats: int = 6) -> float:
    """The FLOP/s MFU is measured against: a data-sheet peak for known GPUs in 16-bit types, else the
    best rate of `repeats` square matmuls in `dtype` (the attainable peak; ~0.1 s on 2 CPU cores).
    On a busy machine the probe reads low, and MFU high: set `peak_flops` in the config then."""
    if device.type == "cuda" and dtype in (torch.bfloat16, torch.float16):
        flops = gpu_peak_flops(torch.cuda.get_device_name(device))
        if flops is not None:
            return flops
    n = 1024 if device.type == "cpu" else 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = math.inf
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        a @ b
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def gpu_peak_flops(name: str) -> float | None:
    """The data-sheet 16-bit peak of the GPU called `name`, or None when the table lacks it."""
    words = {word.lower() for word in re.split(r"[\s\-]+", name) if word}
    matches = [key for key in GPU_PEAK_FLOPS if {word.lower() for word in key} <= words]
    return GPU_PEAK_FLOPS[max(matches, key=len)] if matches else None


def device_name(device: torch.device) -> str:
    """What run.json and the benchmarks call the device: the GPU's name, Apple's GPU, or the CPU's model."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return f"Apple GPU (MPS, {platform.machine()})"
    return cpu_name()


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def available_memory(device: torch.device) -> int | None:
    """Bytes that can still be allocated on `device`: CUDA's free memory, what Metal recommends for
    MPS less what it holds, or on a Linux CPU the kernel's MemAvailable (free plus reclaimable page
    cache); None where it is not known."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "mps":
        return max(0, torch.mps.recommended_max_memory() - torch.mps.driver_allocated_memory())
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # in kB
    except OSError:
        pass
    return None


def synchronize(device: torch.device) -> None:
    """Wait until the device has run what was queued on it (GPUs return before; the CPU does not)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def peak_rss_mb() -> float:
    """This process's peak resident memory in MiB: Linux's VmHWM, which starts afresh at exec (a
    child's rusage maximum starts at its parent's), else the rusage maximum."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 1024 if sys.platform != "darwin" else peak / 2**20  # KiB on Linux, bytes on macOS


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The autocast dtype: "auto" is bfloat16 where the device multiplies it natively, float16 on
    GPUs without bfloat16, float32 elsewhere (emulated bfloat16 is far slower than float32)."""
    if name == "auto":
        if device.type == "cuda" and not native_bfloat16(device):
            return torch.float16
        return torch.bfloat16 if native_bfloat16(device) else torch.float32
    if name == "float16" and device.type != "cuda":
        raise UserError(f"dtype float16 trains on CUDA devices only; use bfloat16 or float32 on {device.type}")
    if name == "bfloat16" and device.type == "cuda" and not native_bfloat16(device):
        raise UserError(f"{torch.cuda.get_device_name(device)} has no native bfloat16; "
                        f"use float16 or float32")
    return getattr(torch, name)


def weights_dtype(requested: str, stored: torch.dtype, device: torch.device) -> tuple[torch.dtype, str]:
    """The dtype to hold a checkpoint's weights in for inference, and why, for `--dtype requested`
    (auto, float32, bfloat16, float16) and weights stored as `stored`.

    "auto": a 16-bit checkpoint stays 16-bit where the device multiplies bfloat16 natively (half the
    memory and the bytes read per token, which is what decoding waits on) and becomes float32
    elsewhere (an emulated bfloat16 matmul is ~200x slower than float32 on an AVX2 CPU); a float32
    checkpoint runs in bfloat16 on a GPU with it (as before: half the memory, tensor cores), else
    stays float32."""
    where = "this CPU" if device.type == "cpu" else device.type
    if requested != "auto":
        if requested not in ("float32", "bfloat16", "float16"):
            raise UserError(f"unknown dtype {requested!r} (use auto, float32, bfloat16 or float16)")
        return getattr(torch, requested), "as asked (--dtype)"
    native = native_bfloat16(device)
    stored_name = str(stored).removeprefix("torch.")
    if stored in (torch.bfloat16, torch.float16):
        if native:
            return torch.bfloat16, f"the checkpoint is {stored_name} and {where} multiplies bfloat16 natively"
        return torch.float32, (f"the checkpoint is {stored_name}, but {where} has no native bfloat16 "
                               f"(--dtype bfloat16 halves the memory at a cost in speed)")
    if native and device.type != "cpu":
        return torch.bfloat16, f"{where} multiplies bfloat16 natively (the checkpoint is {stored_name})"
    return torch.float32, f"the checkpoint is {stored_name}"


def autocast_for(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """Autocast to `dtype` on `device` (a no-op for float32): how training and evaluation run."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


def rng_state(device: torch.device) -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    elif device.type == "mps":
        state["mps"] = torch.mps.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
    elif device.type == "mps" and "mps" in state:
        torch.mps.set_rng_state(state["mps"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@contextlib.contextmanager
def graceful_stop(flag: threading.Event) -> Iterator[None]:
    """Within the block, the first Ctrl-C (or SIGTERM, which torchrun sends its workers) sets `flag`
    so the loop can save and stop at the end of the step; a second Ctrl-C interrupts at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        if flag.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        flag.set()

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


# --------------------------------------------------------------------------------------------
# Processes (torchrun)


@dataclass(frozen=True)
class Distributed:
    """Where this process stands among the processes torchrun started (one process: rank 0 of 1)."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def process_device(name: str, world_size: int, local_rank: int) -> torch.device:
    """This process's device for a --device value: under torchrun every process takes the GPU of its
    LOCAL_RANK, so an explicit cuda:N (which would put every process on GPU N) is refused."""
    if world_size > 1 and name.startswith("cuda:"):
        raise UserError(f"device {name!r} under torchrun would put every process on one GPU; use "
                        f"device=cuda (each process then takes the GPU of its LOCAL_RANK)")
    device = resolve_device(name)
    if device.type == "mps" and world_size > 1:
        raise UserError("torchrun on MPS: PyTorch has no process group for Apple's GPU; train in one process")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank if world_size > 1 else torch.cuda.current_device())
    return device


def init_distributed(device_name: str) -> Distributed:
    """Rank, world size and device; under torchrun, join the process group (NCCL or gloo)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    device = process_device(device_name, world_size, int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True  # float32 matmuls on tensor cores
        torch.backends.cudnn.allow_tf32 = True
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None)
    return Distributed(rank, world_size, device)


def teardown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def rank_zero_first(work: Callable[[], T], processes: Distributed) -> T:
    """`work()` on rank 0, then on the other ranks (which then find what rank 0 built, e.g. a cached
    token store), with every rank agreeing on the outcome: when rank 0 raises a UserError, every
    rank raises it. The wait has its own long timeout, on a CPU group (preparing can take hours)."""
    if processes.world_size == 1:
        return work()
    group = dist.new_group(backend="gloo", timeout=PREPARATION_TIMEOUT)
    failure: UserError | None = None
    if processes.is_main:
        try:
            result = work()
        except UserError as error:
            failure = error
    message = [str(failure) if failure else None]
    dist.broadcast_object_list(message, src=0, group=group)
    dist.destroy_process_group(group)
    if failure is not None:
        raise failure
    if message[0] is not None:
        raise UserError(message[0])
    return result if processes.is_main else work()
