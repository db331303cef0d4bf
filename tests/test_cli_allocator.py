"""The allocator settings every entry point makes (glibc only): a step's freed activations are
reused by the next step, not returned to the kernel and faulted back in."""

from __future__ import annotations

import resource
import sys

import pytest
import torch

from escarda_lab.cli import MMAP_THRESHOLD, malloc_mmap_threshold


def minor_faults_of_a_step(tensors: int, numel: int) -> int:
    """Page faults while `tensors` activations of `numel` floats are allocated and touched; freed after."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    step = [torch.ones(numel) for _ in range(tensors)]
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    del step
    return faults


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_a_steps_freed_activations_are_reused_without_page_faults():
    malloc_mmap_threshold(MMAP_THRESHOLD)
    numel = MMAP_THRESHOLD // 2 // 4  # 8 MiB fp32 tensors: from the heap, not mappings of their own
    faults = [minor_faults_of_a_step(6, numel) for _ in range(6)]  # steps of 48 MiB each
    pages = 6 * numel * 4 // 4096
    # after the first steps the memory is found again (with a 32 MiB trim threshold: none of it)
    assert min(faults[3:]) < pages // 16
