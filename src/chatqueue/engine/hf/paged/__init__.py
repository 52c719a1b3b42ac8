"""The paged KV runner: KV in a pool of blocks the scheduler allocates, attention through block
tables, prefix reuse, and prefill chunks that share steps with decode."""

from chatqueue.engine.hf.paged.pool import KVPool, check_paged_supported, num_blocks_for
from chatqueue.engine.hf.paged.runner import HFPagedRunner

__all__ = ["HFPagedRunner", "KVPool", "check_paged_supported", "num_blocks_for"]
