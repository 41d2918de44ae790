"""Issue 19's hostile load: bench/soak.py --mix hostile for 40 s against a live tiny server.
Four workers take the hostile clients of bench/hostile.py in turn (huge token-id bodies,
surrogates, too many sequences, too large a response, a client that stops reading, one that
sends headers slowly, long stop-token and logit-bias lists, grammars, /tokenize and
/detokenize floods) while a well-behaved client streams and /health is timed every 50 ms.
No 5xx; every hostile client gets its 4xx (or its connection closed); /health's p99 stays
under 250 ms; the well-behaved stream never waits 2 s for a chunk and every one of its
streams completes; RSS grows by at most 25 %; at the end nothing runs or waits and no KV page
is in use."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from hostile import KINDS as HOSTILE_KINDS  # noqa: E402


@pytest.mark.timeout(400)
def test_hostile_load(tmp_path) -> None:
    from tiny import save_tiny

    model = save_tiny(tmp_path / "model")
    out = tmp_path / "hostile.json"
    command = [
        sys.executable,
        "bench/soak.py",
        "--mix",
        "hostile",
        "--duration",
        "40",
        "--concurrency",
        "4",
        "--model",
        str(model),
        "--kv-cache-memory",
        "32MiB",
        "--sample-every",
        "10",
        "--json",
        str(out),
        "--plot",
        str(tmp_path / "hostile.png"),
    ]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=360)
    result = json.loads(out.read_text())
    log = out.with_suffix(".server.log").read_text()[-3000:]
    assert done.returncode == 0 and result["ok"], (result["checks"], result["unexpected"][:5], log, done.stderr[-2000:])
    assert set(result["requests"]) == set(HOSTILE_KINDS)  # every kind ran
    assert result["health"]["p99_s"] < 0.25 and not result["health"]["non_200"]
    steady = result["steady_stream"]
    assert steady["broken_streams"] == 0 and steady["chunks"] > 100 and steady["max_gap_s"] < 2.0
    assert result["final_state"] == {"kv_usage": 0.0, "running": 0.0, "waiting": 0.0}
    assert result["rss_mib"]["final"] <= 1.25 * result["rss_mib"]["first_sample"]
