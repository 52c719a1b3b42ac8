"""A compiled region (`engine/hf/static/regions.py`) called with a tensor of other static sizes
(a sliding-window layer's ring of KV columns beside a full layer's rows) gets a function
compiled for those sizes, kept beside the first, and never goes through the first one's
guards."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from chatqueue.engine.hf.static.regions import Region


def _layer(hidden: torch.Tensor, cache: torch.Tensor) -> torch.Tensor:
    """Rows [0, b) of a whole cache buffer, as a decoder layer reads its KV."""
    return hidden * 2 + cache[: hidden.shape[0]].sum(dim=-1)


@pytest.mark.timeout(600)  # Inductor's C++ compile, twice, on the suite's 2 cores
def test_a_region_compiles_once_for_each_static_size(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    torch._dynamo.reset()
    region = Region(_layer, dynamic=("hidden",), folder=tmp_path, model_key="test")
    full, ring = torch.randn(4, 40), torch.randn(4, 8)
    with caplog.at_level(logging.INFO, logger="chatqueue.engine.hf.static.regions"):
        for rows in (4, 3, 4):
            hidden = torch.randn(rows)
            for cache in (full, ring):
                got = region(hidden, cache)
                torch.testing.assert_close(got, _layer(hidden, cache))
    assert len(list(tmp_path.glob("*.bin"))) == 2
    assert "guards refused" not in caplog.text
    assert "JIT instead" not in caplog.text
