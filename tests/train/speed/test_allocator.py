"""`keep_freed_buffers` (train/speed/allocator.py): glibc malloc keeps the step's freed buffers for reuse."""

from __future__ import annotations

import pytest

from domaintune.train.speed.allocator import keep_freed_buffers
from train_helpers import KEPT_MALLOC, is_glibc_linux


@pytest.mark.skipif(not is_glibc_linux(), reason="mallopt tuning applies to Linux/glibc only")
def test_keep_freed_buffers_sets_glibc_malloc_thresholds():
    assert keep_freed_buffers() == KEPT_MALLOC
    assert keep_freed_buffers() == KEPT_MALLOC  # idempotent: mallopt accepts the same values again
