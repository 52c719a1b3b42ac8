"""The attention kernels in Triton's CPU interpreter, before a GPU run. The decode kernel
(`engine/hf/triton_decode.py`) against a float reference: the static cache (its rows whole, or
rings of a sliding window's columns) and the paged pool, one split and several (the merge
kernel), three head layouts, soft-capped scores, the step's new value a strided view of a q/k/v
projection as the decode step gives it; and the step's key and value written exactly where the
cache's own ops would write them. The packed step's kernel (`triton_packed.py`: causal,
windowed, soft-capped) against its contract in torch (`tests/support/packed_reference.py`).

Needs Triton (not a dependency of the package; `pip install triton` into a scratch folder, then
`PYTHONPATH=that:src`); runs on any CPU, no GPU:

    PYTHONPATH=/tmp/triton:src .venv/bin/python benchmarks/check_decode_kernel.py
"""

from __future__ import annotations

import os
import sys

os.environ["TRITON_INTERPRET"] = "1"

import torch
from triton.runtime import interpreter

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # tests/

from chatqueue.engine.hf import triton_decode, triton_packed
from tests.support import packed_reference

# NOTE: Triton 3.6's interpreter turns a loaded scalar into an index with int() of a 1-element
# array, which numpy >= 2.4 refuses; a loop bound read from memory then fails. Same value, read
# as the one element it is.
_patch_tensor = interpreter._patch_lang_tensor


def _patch_lang_tensor(tensor, scope):  # type: ignore[no-untyped-def]
    _patch_tensor(tensor, scope)
    scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))


interpreter._patch_lang_tensor = _patch_lang_tensor

SCALE = 0.3


def reference(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    starts: list[int],
    ends: list[int],
    softcap: float,
) -> torch.Tensor:
    """q [B, KV, G, D] over row r's positions [starts[r], ends[r]) of keys, values [B, KV, L, D]."""
    rows = []
    for r in range(q.shape[0]):
        k = keys[r, :, starts[r] : ends[r]].double()
        v = values[r, :, starts[r] : ends[r]].double()
        s = torch.einsum("hgd,hnd->hgn", q[r].double(), k) * SCALE
        if softcap:
            s = softcap * torch.tanh(s / softcap)
        rows.append(torch.einsum("hgn,hnd->hgd", torch.softmax(s, -1), v))
    return torch.stack(rows)


def new_kv(b: int, kv: int, groups: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The step's new k (dense, as after RoPE) and v (a view of the q/k/v output), [B, KV, 1, D]."""
    k = torch.randn(b, kv, 1, d)
    qkv = torch.randn(b, 1, (groups * kv + 2 * kv) * d)
    v = qkv[..., (groups * kv + kv) * d :].view(b, 1, kv, d).transpose(1, 2)
    return k, v


def check_static(kv: int, groups: int, d: int, softcap: float) -> float:
    b, rows_all, length, col = 3, 5, 700, 600
    k_cache, v_cache = torch.randn(rows_all, kv, length, d), torch.randn(rows_all, kv, length, d)
    q = torch.randn(b, kv, groups, d)
    k, v = new_kv(b, kv, groups, d)
    start = torch.tensor([0, 37, 590])
    k_want, v_want = k_cache.clone(), v_cache.clone()
    k_want[:b, :, col], v_want[:b, :, col] = k[:, :, 0], v[:, :, 0]
    want = reference(q, k_want, v_want, start.tolist(), [col + 1] * b, softcap)
    got = triton_decode.decode_attention(
        q, k_cache, v_cache, k, v, start, torch.tensor([col]), SCALE, softcap, False
    )
    assert torch.equal(k_cache, k_want) and torch.equal(v_cache, v_want), "the cache's write"
    return (got.double() - want).abs().max().item()


def check_ring(kv: int, groups: int, d: int, softcap: float) -> float:
    """A sliding-window layer's rows as rings of W columns (column c at c % W), once the ring
    has wrapped and before: each row attends to its last W columns, or from its start."""
    worst = 0.0
    b, rows_all, window = 3, 5, 600
    for col, starts in ((1500, [0, 1200, 1490]), (300, [0, 37, 290])):
        k_ring, v_ring = torch.randn(rows_all, kv, window, d), torch.randn(rows_all, kv, window, d)
        q = torch.randn(b, kv, groups, d)
        k, v = new_kv(b, kv, groups, d)
        start = torch.tensor([max(s, col - window + 1) for s in starts])  # the span's start
        k_want, v_want = k_ring.clone(), v_ring.clone()
        k_want[:b, :, col % window], v_want[:b, :, col % window] = k[:, :, 0], v[:, :, 0]
        keys = torch.zeros(b, kv, col + 1, d)  # by absolute column, the ring's last W filled
        values = torch.zeros_like(keys)
        for c in range(max(0, col - window + 1), col + 1):
            keys[:, :, c], values[:, :, c] = k_want[:b, :, c % window], v_want[:b, :, c % window]
        want = reference(q, keys, values, start.tolist(), [col + 1] * b, softcap)
        got = triton_decode.decode_attention(
            q, k_ring, v_ring, k, v, start, torch.tensor([col]), SCALE, softcap, True
        )
        assert torch.equal(k_ring, k_want) and torch.equal(v_ring, v_want), "the ring's write"
        worst = max(worst, (got.double() - want).abs().max().item())
    return worst


def check_paged(kv: int, groups: int, d: int, softcap: float) -> float:
    b, size, num_blocks, width = 3, 16, 64, 20
    k_pool, v_pool = torch.randn(kv, num_blocks * size, d), torch.randn(kv, num_blocks * size, d)
    q = torch.randn(b, kv, groups, d)
    k, v = new_kv(b, kv, groups, d)
    ends, starts = torch.tensor([5, 300, 17]), torch.tensor([0, 44, 16])
    table = torch.randperm(num_blocks)[: b * width].view(b, width).int()  # no block shared

    def slot(r: int, n: int) -> int:
        return int(table[r, n // size]) * size + n % size

    k_want, v_want = k_pool.clone(), v_pool.clone()
    for r in range(b):
        last = slot(r, int(ends[r]) - 1)
        k_want[:, last], v_want[:, last] = k[r, :, 0], v[r, :, 0]
    keys = torch.zeros(b, kv, width * size, d)
    values = torch.zeros_like(keys)
    for r in range(b):
        for n in range(int(ends[r])):
            keys[r, :, n], values[r, :, n] = k_want[:, slot(r, n)], v_want[:, slot(r, n)]
    want = reference(q, keys, values, starts.tolist(), ends.tolist(), softcap)
    got = triton_decode.paged_decode_attention(
        q, k_pool, v_pool, k, v, table, starts, ends, SCALE, softcap, size
    )
    assert torch.equal(k_pool, k_want) and torch.equal(v_pool, v_want), "the pool's write"
    return (got.double() - want).abs().max().item()


def check_packed(kv: int, groups: int, d: int, softcap: float, window: int) -> float:
    """The packed step's kernel (`triton_packed.py`) against its contract in torch
    (`tests/support/packed_reference.py`): two sequences' chunks and a decode row in tiles,
    causal, within a window where given (tiles whose first rows see nothing of a block)."""
    size, num_blocks, width = 16, 64, 12
    k_pool, v_pool = torch.randn(kv, num_blocks * size, d), torch.randn(kv, num_blocks * size, d)
    table = torch.randperm(num_blocks)[: 3 * width].view(3, width).int()
    per_tile = triton_packed.tokens_a_tile(groups)
    tiles, ends, first = [], [], 0
    for row, (begin, n) in enumerate(((0, 70), (100, 1), (37, 150))):  # (first position, tokens)
        for at in range(0, n, per_tile):
            took = min(per_tile, n - at)
            tiles.append((first + at, took, row))
            ends.append(begin + at + took)
        first += n
    q = torch.randn(first, kv, groups, d)
    tiles_t, ends_t = torch.tensor(tiles), torch.tensor(ends)
    args = (q, k_pool, v_pool, tiles_t, ends_t, table, size, SCALE, softcap, window)
    want = packed_reference.packed_attention(*args)
    got = triton_packed.packed_attention(*args)
    return (got.double() - want.double()).abs().max().item()


def main() -> None:
    torch.manual_seed(0)
    worst = 0.0
    for splits in (1, 3):
        # NOTE: the splits as the GPU would choose them for this many rows, fixed here
        triton_decode.splits_for = lambda rows, num_kv, max_len, device, n=splits: min(  # type: ignore[misc]
            n, -(-max_len // 256)
        )
        for kv, groups, d, softcap in (
            (2, 4, 64, 0.0),
            (1, 4, 32, 0.0),
            (4, 1, 16, 0.0),
            (2, 2, 32, 50.0),
        ):
            checks = (("static", check_static), ("ring", check_ring), ("paged", check_paged))
            for name, check in checks:
                err = check(kv, groups, d, softcap)
                worst = max(worst, err)
                print(
                    f"{name:6s} splits {splits}, {kv} KV heads x {groups} x {d}, softcap "
                    f"{softcap:g}: max error {err:.1e}"
                )
    for kv, groups, d, softcap, window in (
        (2, 4, 64, 0.0, 0),
        (2, 4, 64, 0.0, 24),
        (1, 4, 32, 0.0, 100),
        (4, 1, 16, 0.0, 5),
        (2, 2, 32, 50.0, 40),
    ):
        err = check_packed(kv, groups, d, softcap, window)
        worst = max(worst, err)
        print(
            f"packed {kv} KV heads x {groups} x {d}, softcap {softcap:g}, window {window}: "
            f"max error {err:.1e}"
        )
    print(f"worst {worst:.1e}")
    sys.exit(0 if worst < 1e-4 else 1)


if __name__ == "__main__":
    main()
