"""Compiled regions of the decode step, kept on disk so that a later process skips the compiler.

NOTE: why. `torch.compile` re-traces a function with Dynamo in every new process, even when
Inductor's caches hold every kernel: on an H200 that was 11-12 s of each warm start and of each
restart of the model process (benchmarks/RESULTS.md, issue 12). A region compiled ahead of time
(`torch.compile(...).aot_compile`) is a serializable artifact: the first process to need it
compiles and saves it; the next one loads it and calls it with no tracing at all.

A region is a function of tensors and modules whose batch dimension varies (the decode step's
start, one decoder layer, its end). Its artifact is keyed by everything that shapes the code:
the model (its config and dtype, given by the caller), the source of this package (the region
calls into attention and kernels beside it), torch's and transformers' versions, the device, and
each argument's dtype, static sizes and module structure, with the batch dimension symbolic. Where ahead-of-time compilation is
unavailable or fails, the region falls back to `torch.compile`, as before.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.metadata
import inspect
import logging
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)


class Region:
    """`fn` compiled with the arguments named in `dynamic` symbolic in their first dimension,
    from `folder` when an artifact there fits, else compiled and saved there."""

    def __init__(
        self,
        fn: Callable[..., Any],
        *,
        dynamic: Sequence[str],
        folder: Path | None,
        model_key: str = "",
    ) -> None:
        self._fn = fn
        self._model_key = model_key
        self._owner = getattr(fn, "__self__", None)  # a bound method: its object is argument 0
        self._globals: dict[str, Any] = getattr(fn, "__func__", fn).__globals__
        params = list(inspect.signature(fn).parameters)
        unknown = set(dynamic) - set(params)
        assert not unknown, f"no such parameters of {fn.__name__}: {sorted(unknown)}"
        self._dynamic = frozenset(params.index(name) for name in dynamic)
        self._folder = folder
        self._compiled: dict[tuple[Any, ...], Callable[..., Any]] = {}
        self._jit: Callable[..., Any] | None = None

    def __reduce__(self) -> tuple[Any, ...]:
        # NOTE: Dynamo pickles a region's owner (the decode class, as fake tensors and plain
        # values) into the guards of each region compiled after it, this region among the
        # owner's attributes; what it compiled cannot be pickled and plays no part in guards.
        return (type(None), ())

    def __call__(self, *args: Any) -> Any:
        # NOTE: an argument that is None in one call and a tensor in another (the first layer's
        # residual), a tensor of other static sizes (a sliding-window layer's ring of KV
        # columns) or another plain value (its window) changes the graph: each has a compiled
        # function of its own.
        pattern = tuple(self._static_sizes(i, a) for i, a in enumerate(args))
        compiled = self._compiled.get(pattern)
        if compiled is None:
            compiled = self._compiled[pattern] = self._compile(args)
        return compiled(*args)

    def _static_sizes(self, i: int, arg: Any) -> Any:
        """What of argument i a compiled function is specialised to: a tensor's static sizes, a
        plain value itself (a layer's sliding window), else nothing."""
        if isinstance(arg, torch.Tensor):
            return tuple(arg.shape[1:] if i in self._dynamic else arg.shape)
        if arg is None or isinstance(arg, int | float | bool | str):
            return ("value", arg)
        return ()

    def _compile(self, args: tuple[Any, ...]) -> Callable[..., Any]:
        if self._folder is None or not hasattr(torch.compiler, "load_compiled_function"):
            return self._jit_compiled()
        path = self._folder / f"{self._fn.__name__.strip('_')}-{self._key(args)}.bin"
        began = time.perf_counter()
        try:
            if path.is_file():
                with path.open("rb") as f:
                    # NOTE: the globals the region's code reads (torch, F): where a process has
                    # traced the same code before (several models in one process), the loader
                    # no longer finds them itself
                    loaded = torch.compiler.load_compiled_function(f, f_globals=self._globals)
                how = "loaded"
            else:
                loaded = self._aot_compile(args, path)
                how = "compiled and saved"
        except Exception:
            log.warning("%s: compiling ahead of time failed; JIT instead", path.name, exc_info=True)
            return self._jit_compiled()
        log.info("region %s %s in %.1f s", path.name, how, time.perf_counter() - began)
        return self._guarded(loaded)

    def _aot_compile(self, args: tuple[Any, ...], path: Path) -> Callable[..., Any]:
        for i in self._dynamic:
            if isinstance(args[i], torch.Tensor):
                torch._dynamo.mark_dynamic(args[i], 0)
        # NOTE: torch 2.11 offers aot_compile behind a flag (later releases always).
        dynamo_config: Any = torch._dynamo.config
        enabled = (
            dynamo_config.patch(enable_aot_compile=True)
            if hasattr(dynamo_config, "enable_aot_compile")
            else contextlib.nullcontext()
        )
        with _no_duck_shapes(), enabled:
            jit: Any = torch.compile(self._fn, fullgraph=True)
            compiled = jit.aot_compile((args, {}))
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        os.close(fd)
        try:
            compiled.save_compiled_function(tmp)
            os.replace(tmp, path)  # whole or not at all: another process may be loading it
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        return compiled  # type: ignore[no-any-return]

    def _guarded(self, compiled: Callable[..., Any]) -> Callable[..., Any]:
        """The AOT function (a bound method's object passed first), or JIT where its guards
        refuse a call (a batch size it was not compiled for)."""
        owner = () if self._owner is None else (self._owner,)

        def call(*args: Any) -> Any:
            try:
                return compiled(*owner, *args)
            except RuntimeError as exc:
                if "GuardManager check failed" not in str(exc):
                    raise
                log.info("%s: guards refused a call; JIT for it", self._fn.__name__)
                return self._jit_compiled()(*args)

        return call

    def _jit_compiled(self) -> Callable[..., Any]:
        if self._jit is None:
            self._jit = _no_duck_shapes()(torch.compile(self._fn, dynamic=True))
        return self._jit

    def _key(self, args: tuple[Any, ...]) -> str:
        parts = [self._model_key, _source_digest(), torch.__version__, _device_name(args)]
        parts.append(importlib.metadata.version("transformers"))
        parts += [_describe(a, symbolic=i in self._dynamic) for i, a in enumerate(args)]
        if self._owner is not None:
            parts.append(_describe(self._owner, symbolic=False))
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:24]


def _describe(arg: Any, *, symbolic: bool) -> str:
    """What of an argument shapes the compiled code: a tensor's dtype, sizes and strides (the
    first size as `b` where it is symbolic), a module's parameters, a plain value as itself."""
    if isinstance(arg, torch.Tensor):
        sizes = ["b" if symbolic and d == 0 else str(s) for d, s in enumerate(arg.shape)]
        return f"T({arg.dtype},{','.join(sizes)},contiguous={arg.is_contiguous()})"
    if isinstance(arg, torch.nn.Module):
        params = ",".join(f"{n}:{p.dtype}{tuple(p.shape)}" for n, p in arg.named_parameters())
        return f"M({type(arg).__qualname__},{params})"
    if arg is None or isinstance(arg, int | float | bool | str):
        return repr(arg)
    # an object whose attributes the region reads (the decode class): its plain settings
    plain = {k: v for k, v in vars(arg).items() if isinstance(v, int | float | bool | str | list)}
    return f"O({type(arg).__qualname__},{sorted(plain.items())})"


@functools.cache
def _source_digest() -> str:
    """Every module of the hf engine: a region's code reaches beyond its own function."""
    package = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _device_name(args: tuple[Any, ...]) -> str:
    for arg in args:
        if isinstance(arg, torch.Tensor) and arg.device.type == "cuda":
            major, minor = torch.cuda.get_device_capability(arg.device)
            return f"cuda:{torch.cuda.get_device_name(arg.device)}:sm{major}{minor}"
    return "cpu"


def _no_duck_shapes() -> Any:
    """NOTE: by default Dynamo gives sizes of equal value one symbol, so a first compile at batch
    64 of a model whose head_dim is 64 tied the two together and compiled again at 48 (3 s of a
    restart on an H200)."""
    from torch.fx.experimental import _config as fx_config

    return fx_config.patch(use_duck_shape=False)  # type: ignore[attr-defined]
