"""
What the machine is and holds, for the benchmarks (bench.py): its name, a device sync before the
clock is read, and peak memory. Nothing here changes what a run computes.
"""

import os
import platform

import torch


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def device_name(sys_):
    if sys_.device_type == "cuda":
        return torch.cuda.get_device_name(sys_.device)
    return f"{cpu_name()}, {os.cpu_count()} logical cores"


def sync(sys_):
    if sys_.device_type == "cuda":
        torch.cuda.synchronize()


def reset_peak_memory(sys_):
    if sys_.device_type == "cuda":
        torch.cuda.reset_peak_memory_stats(sys_.device)
    else:
        try:  # Linux: reset the process's peak resident set size (VmHWM) to its current size
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass


def peak_memory_mb(sys_):
    """GPU: peak allocated by PyTorch. CPU: the process's peak resident set (all models of
    the run included), since the last reset."""
    if sys_.device_type == "cuda":
        return torch.cuda.max_memory_allocated(sys_.device) / 2 ** 20
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")
