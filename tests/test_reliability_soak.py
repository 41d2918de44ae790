"""bench/soak.py for 60 seconds, as CI runs it: mixed load (short, long, streaming, cancelled,
garbage) on the tiny model; no 5xx, every status as expected, and nothing left behind."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(400)
def test_soak_60_seconds(tmp_path) -> None:
    from tiny import save_tiny

    model = save_tiny(tmp_path / "model")
    out = tmp_path / "soak.json"
    command = [
        sys.executable,
        "bench/soak.py",
        "--duration",
        "60",
        "--model",
        str(model),
        "--long-words",
        "150",
        "--kv-cache-memory",
        "32MiB",
        "--sample-every",
        "15",
        "--json",
        str(out),
        "--plot",
        str(tmp_path / "soak.png"),
    ]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=360)
    result = json.loads(out.read_text())
    log = out.with_suffix(".server.log").read_text()[-3000:]
    assert done.returncode == 0 and result["ok"], (result["checks"], result["unexpected"][:5], log)
    assert result["final_state"] == {"kv_usage": 0.0, "running": 0.0, "waiting": 0.0}
    assert len(result["samples"]) >= 4 and (tmp_path / "soak.png").stat().st_size > 0
    assert result["total_requests"] >= 50 and any(kind.startswith("garbage:") for kind in result["requests"])
    assert result["commit"] and result["machine"]["cores"] and "bench/soak.py" in result["command"]
