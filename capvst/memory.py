"""How much memory one stylization may use, and what an image needs untiled or tiled.

No service imports; PyTorch is imported only to ask a GPU for its free memory.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

#: Share of the free GPU memory, or of the available RAM, that the default budget takes.
GPU_SHARE = 0.8
CPU_SHARE = 0.6
#: Peak bytes per pixel of one encode or decode (float32, inference mode, the input and the
#: result included): 668 measured for both configurations at 1024×1024 on a CPU
#: (docs/PERFORMANCE.md), plus a 15 % margin.
ACTIVATION_BYTES_PER_PIXEL = 768
#: Latent bytes per image pixel (32 float32 channels per pixel in both configurations).
LATENT_BYTES_PER_PIXEL = 128
#: The image's own buffers per pixel while it is stylized: the decoded content (3), its array
#: (3), the output (3) and, briefly, the encoded file, rounded up. With 6 counted here, a
#: 3840×2160 item under a 1 GB budget used 1.04 GB above the idle worker (docs/PERFORMANCE.md).
IMAGE_BYTES_PER_PIXEL = 12


def _read_int(path: str) -> int | None:
    try:
        text = Path(path).read_text().strip()
    except OSError:
        return None
    if not text or text == "max":
        return None
    try:
        return int(text)
    except ValueError:
        return None


def available_ram() -> int:
    """Bytes this process can still allocate: MemAvailable, lowered by a cgroup limit."""
    avail: int | None = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
                break
    except (OSError, ValueError, IndexError):
        pass
    if avail is None:
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            avail = 4 << 30
    # cgroup v2, then v1: the container's own limit minus what it uses already
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        limit, usage = _read_int(limit_file), _read_int(usage_file)
        if limit is not None and limit < (1 << 60):
            avail = min(avail, max(0, limit - (usage or 0)))
            break
    return avail


def default_budget(device: Any) -> int:
    """A safe share of the device's free memory (GPU) or of the available RAM (CPU)."""
    if getattr(device, "type", str(device)) == "cuda":
        import torch

        free, _ = torch.cuda.mem_get_info(device)
        return int(free * GPU_SHARE)
    return int(available_ram() * CPU_SHARE)


def default_batch_size(device: Any) -> int:
    """Items per forward pass on ``device`` (a ``torch.device``) when ``CAPVST_BATCH_SIZE`` is
    unset: 4 on a GPU; 1 on a CPU, where a batch is slower per image than one image at a time
    (docs/PERFORMANCE.md)."""
    return 4 if device.type == "cuda" else 1


def untiled_bytes(height: int, width: int) -> int:
    """Estimated peak of encoding or decoding a whole image at once."""
    return height * width * ACTIVATION_BYTES_PER_PIXEL


#: glibc ``mallopt`` parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_allocator_tuned = False


@functools.cache
def _glibc() -> Any:
    """The C library when it is glibc (it has ``mallopt`` and ``malloc_trim``), else None."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.mallopt, libc.malloc_trim  # noqa: B018  # both or neither
    except (OSError, AttributeError):
        return None
    return libc


def tune_cpu_allocator() -> bool:
    """Keep freed activations in the process heap instead of handing them back to the kernel.

    A network pass on a CPU allocates and frees tensors of a few to tens of megabytes hundreds
    of times; with glibc's adaptive defaults many of them are mapped fresh and returned each
    time, and each fresh page costs a fault: about 8 % of a pass at 512×384 is spent in the
    kernel (docs/PERFORMANCE.md). Allocations up to 32 MiB (glibc's largest heap threshold
    on 64-bit systems) then come from the heap, and up to 256 MiB of free heap top is kept.
    Larger blocks (the tiles of huge images) are still mapped and returned at once, and tiled
    passes trim the heap between tiles (:func:`release_freed`). Values are unaffected. glibc
    only; elsewhere, or with ``CAPVST_CPU_ALLOCATOR=default``, nothing happens. Returns
    whether the settings are applied (once per process).
    """
    global _allocator_tuned
    if _allocator_tuned:
        return True
    libc = _glibc()
    if libc is None or os.environ.get("CAPVST_CPU_ALLOCATOR", "tuned") == "default":
        return False
    _allocator_tuned = libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20) == 1 \
        and libc.mallopt(_M_TRIM_THRESHOLD, 256 << 20) == 1
    return _allocator_tuned


def release_freed() -> None:
    """Hand the heap's free pages back to the kernel (glibc ``malloc_trim``), between the tiles
    of a huge image: freed tile activations otherwise stay resident, scattered through the
    heap, and the next tile's pass comes on top of them. A no-op elsewhere."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
