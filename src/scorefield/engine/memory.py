"""How much memory a device has free right now, so that a plan within the memory budget is also checked
against what the machine (or the GPU) can actually give."""
from __future__ import annotations

from pathlib import Path

import torch

from .errors import PatchMemoryError


def free_bytes(device: torch.device | str) -> int | None:
    """Free bytes on `device`: CUDA's free memory, or the CPU's MemAvailable (Linux); None when unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type == "cpu":
        try:
            for line in Path("/proc/meminfo").read_text().splitlines():
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            return None
    return None


def check_fits(estimate: float, device: torch.device | str, what: str, option: str) -> None:
    """Refuse, naming the estimate and the option to change, a plan that needs more than `device` has free."""
    free = free_bytes(device)
    if free is not None and estimate > free:
        raise PatchMemoryError(f"{what} needs about {estimate / 2**20:.0f} MiB but {torch.device(device)} has "
                               f"{free / 2**20:.0f} MiB free; {option}")
