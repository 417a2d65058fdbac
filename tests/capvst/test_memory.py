"""The CPU allocator tuning: applied once on glibc, refused on request, values unchanged."""

import subprocess
import sys

import torch

from capvst import memory
from capvst.model import untrained

PROBE = ("from capvst import memory; ok = memory.tune_cpu_allocator(); "
         "print(ok, memory.tune_cpu_allocator())")


def _probe(env_value: str | None) -> str:
    import os

    env = {k: v for k, v in os.environ.items() if k != "CAPVST_CPU_ALLOCATOR"}
    if env_value is not None:
        env["CAPVST_CPU_ALLOCATOR"] = env_value
    return subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True,
                          text=True, check=True).stdout.strip()


def test_applied_once_on_glibc_and_refused_on_request():
    assert _probe(None) == "True True"  # this machine's libc is glibc
    assert _probe("default") == "False False"


def test_a_tuned_process_computes_the_same_latents():
    net = untrained("photorealistic").net
    x = torch.rand(1, 3, 64, 48, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        before = net(x)
        assert memory.tune_cpu_allocator()
        after = net(x)
    assert torch.equal(before, after)
