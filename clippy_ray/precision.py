"""`precision: auto`: bf16 where the device runs bf16 matmuls natively and fast, fp32 elsewhere.

On a CPU without native bf16 (no AVX512-BF16 / AMX) a bf16 matmul is emulated and runs ~30x
slower than fp32, so "bf16 everywhere" turns a minutes-long CPU run into a quarter of an hour.
Plain torch; no Ray, no DeepSpeed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

# dtype names as configs spell them: train.precision / loss.matmul_dtype
TORCH_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "bfloat16": torch.bfloat16, "float32": torch.float32}
_CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@dataclass(frozen=True)
class Choice:
    precision: str  # "bf16" or "fp32"
    reason: str  # one line a person reads at start-up

    @property
    def dtype(self) -> torch.dtype:
        return TORCH_DTYPES[self.precision]


def cpu_bf16_flags(cpuinfo: str | None = None) -> list[str]:
    """The native-bf16 instruction sets the CPU announces (Linux /proc/cpuinfo; [] elsewhere)."""
    if cpuinfo is None:
        path = Path("/proc/cpuinfo")
        cpuinfo = path.read_text() if path.exists() else ""
    flags = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[-1].split())
    return [f for f in _CPU_BF16_FLAGS if f in flags]


def matmul_gflops(dtype: torch.dtype, size: int = 256, seconds: float = 0.1, device: str = "cpu") -> float:
    """Dense [size, size] matmul throughput in GFLOP/s, timed for about `seconds` (a GPU is
    synchronized after each matmul, so the time is the device's, not the launches')."""
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    for _ in range(2):  # warm-up: kernel selection, page faults
        a @ b
    sync()
    n, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        a @ b
        sync()
        n += 1
    return 2 * size**3 * n / elapsed / 1e9


def cuda_choice(name: str, capability: tuple[int, int]) -> Choice:
    """`auto` on a GPU: bf16 where its tensor cores run bf16 (compute capability 8.0 on: A100, H100,
    L4, RTX 30xx on). torch.cuda.is_bf16_supported() also says yes on V100 and T4 (7.x), where bf16
    is emulated through float32 and slower than fp16 or fp32."""
    major, minor = capability
    if (major, minor) >= (8, 0):
        return Choice("bf16", f"{name} (compute capability {major}.{minor}) runs bf16 natively")
    return Choice("fp32", f"{name} (compute capability {major}.{minor}) has no native bf16 (needs 8.0 or later)")


def choose(requested: str, device: torch.device, cpuinfo: str | None = None) -> Choice:
    """Resolve train.precision: an explicit bf16 / fp32 wins; `auto` asks the device (on a CPU:
    its flags in `cpuinfo`, default /proc/cpuinfo, then a short matmul race)."""
    if requested != "auto":
        return Choice(requested, "set in the config")
    if device.type == "cuda":
        return cuda_choice(torch.cuda.get_device_name(device), torch.cuda.get_device_capability(device))
    flags = cpu_bf16_flags(cpuinfo)
    if not flags and (cpuinfo is not None or Path("/proc/cpuinfo").exists()):
        return Choice("fp32", "this CPU has no native bf16 (no avx512_bf16 / amx_bf16 flag)")
    # Flags say yes (or there are none to read): check that the math library actually uses them.
    bf16, fp32 = matmul_gflops(torch.bfloat16), matmul_gflops(torch.float32)
    measured = f"bf16 matmul {bf16:.0f} GFLOP/s vs fp32 {fp32:.0f}"
    if bf16 >= fp32:
        return Choice("bf16", f"native bf16 ({', '.join(flags) or 'measured'}): {measured}")
    return Choice("fp32", f"bf16 is slower here: {measured}")


def matmul_dtype(setting: str, precision: str) -> torch.dtype:
    """loss.matmul_dtype: `auto` follows the training precision; softmax stays float32 either way."""
    return TORCH_DTYPES[precision if setting == "auto" else setting]
