"""Each benchmark script once, in its smallest setting (no timings are asserted)."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str) -> str:
    out = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_capacity(tmp_path) -> None:
    stdout = run(
        "bench/capacity.py", "--kv-cache-memory", "1GiB", "--lengths", "512,2048", "--json", str(tmp_path / "c.json")
    )
    table = json.loads((tmp_path / "c.json").read_text())["results"]
    assert table["SmolLM2-135M"]["logquant"]["2048"] > 3 * table["SmolLM2-135M"]["fp16"]["2048"]
    assert "Llama-3.1-8B" in stdout


@pytest.mark.real_model
def test_serve_and_plots(tmp_path) -> None:
    out = tmp_path / "serve.json"
    stdout = run(
        "bench/serve.py",
        "--policies",
        "fp16,logquant",
        "--num-requests",
        "2",
        "--concurrency",
        "1,2",
        "--max-tokens",
        "4",
        "--json",
        str(out),
    )
    runs = json.loads(out.read_text())["runs"]
    assert set(runs) == {"fp16 c=1", "fp16 c=2", "logquant c=1", "logquant c=2"}
    assert all(r["errors"] == 0 and r["output_tokens"] > 0 for r in runs.values())
    assert "ratios" in stdout
    cov, ppl, pk, cap = (tmp_path / f"{name}.json" for name in ("cov", "ppl", "pk", "cap"))
    run("-m", "logquant.eval", "coverage", "--length", "96", "--budgets", "36", "--match", "bytes", "--json", str(cov))
    run(
        "-m",
        "logquant.eval",
        "ppl",
        "--length",
        "40",
        "--json",
        str(ppl),
        "--configs",
        "fp16,kivi@32,logquant@36,kivi@32:bits=4,logquant@bytes(kivi@32):sinks=4",
    )
    run("-m", "logquant.eval", "passkey", "--lengths", "96", "--cases", "1", "--budgets", "36", "--json", str(pk))
    record = json.loads(ppl.read_text())
    assert record["provenance"]["command"].startswith("python -m logquant.eval ppl --length 40")
    assert set(record["results"]["logquant@bytes(kivi@32):sinks=4"]) >= {"fp_budget", "kv_bytes_per_token", "ppl"}
    report = run("bench/accuracy_report.py", str(ppl), str(pk))
    assert "| `logquant@bytes(kivi@32):sinks=4` |" in report
    assert re.search(r"\| `kivi@36` \| [01]\.\d\d \(36, \d+\) \|", report), report
    run("bench/capacity.py", "--lengths", "512,2048", "--json", str(cap))
    assert json.loads(cap.read_text())["provenance"]["command"].startswith("python bench/capacity.py")
    run(
        "bench/plots.py",
        "--serve",
        str(out),
        "--coverage",
        str(cov),
        "--ppl",
        str(ppl),
        "--passkey",
        str(pk),
        "--capacity",
        str(cap),
        "--out",
        str(tmp_path / "docs"),
    )
    assert len(list((tmp_path / "docs").glob("*.png"))) == 5


@pytest.mark.real_model
def test_compare_with_transformers_serve(tmp_path) -> None:
    if shutil.which("transformers") is None and not (Path(sys.executable).parent / "transformers").exists():
        pytest.skip("the transformers CLI is not installed")
    out = tmp_path / "cmp.json"
    run(
        "bench/compare.py",
        "--scenario",
        "sharegpt",
        "--peers",
        "transformers-cb",
        "--policies",
        "logquant",
        "--num-requests",
        "2",
        "--concurrency",
        "2",
        "--max-tokens",
        "4",
        "--kv-cache-memory",
        "64MiB",
        "--json",
        str(out),
    )
    record = json.loads(out.read_text())
    runs = record["runs"]
    assert set(runs) == {"transformers-cb", "logquant-serve logquant"}
    assert record["provenance"]["command"].startswith("python bench/compare.py")
    assert all(r["errors"] == 0 for r in runs.values())


@pytest.mark.real_model
def test_eval_through_the_engine(tmp_path) -> None:
    """bench/eval_engine.py: logquant.eval's perplexity, with the engine handed in from bench/."""
    out = tmp_path / "ppl_engine.json"
    args = ["ppl", "--length", "24", "--configs", "fp16,logquant@12", "--json", str(out)]
    run("bench/eval_engine.py", *args)
    record = json.loads(out.read_text())
    assert record["args"]["engine"] is True and set(record["results"]) == {"fp16", "logquant@12"}
    assert record["provenance"]["command"].startswith("python bench/eval_engine.py ppl")
    assert all(r["ppl"] > 1 for r in record["results"].values())
    assert record["results"]["fp16"]["top1_agreement"] == 1.0
