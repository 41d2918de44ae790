"""The evaluation tools on the real default model, in their smallest settings."""

import json

import pytest
import torch

from logquant.eval.__main__ import main
from logquant.eval.configs import CacheConfig
from logquant.eval.coverage import coverage, fp_mask

pytestmark = pytest.mark.real_model


def test_fp_mask_and_coverage_on_hand_made_attention() -> None:
    # 1 layer, 1 head, 6 tokens; query 5 attends 0.5 to token 0 (excluded), 0.25 to 1 and 0.25 to 5
    attn = torch.zeros(1, 6, 6)
    attn[0, 5, [0, 1, 5]] = torch.tensor([0.5, 0.25, 0.25])
    kivi = CacheConfig("kivi", 2)  # residual 2, group 1 (below): full precision = tokens 3, 4 at length 5
    mask = fp_mask(kivi, [5], 6, group_size=1)
    assert mask[0].tolist() == [False, False, False, True, True, True]
    assert coverage([attn], kivi, [5], group_size=1) == pytest.approx(0.5)  # 0.25 of 0.5 (token 0 left out)
    assert coverage([attn], CacheConfig("fp16"), [5]) == pytest.approx(1.0)


@pytest.mark.parametrize(
    "argv",
    [
        ["coverage", "--length", "96", "--budgets", "36"],
        ["ppl", "--length", "40", "--budgets", "36"],
        ["agreement", "--cases", "1", "--length", "48", "--tokens", "4", "--budgets", "36"],
        ["passkey", "--lengths", "96", "--cases", "1", "--budgets", "36"],
    ],
)
def test_eval_modes_print_table_and_write_json(argv, tmp_path, capsys) -> None:
    out = tmp_path / "r.json"
    result = main(argv + ["--json", str(out)])
    printed = capsys.readouterr().out
    assert "kivi" in printed and "logquant" in printed
    saved = json.loads(out.read_text())
    assert saved["mode"] == argv[0] and set(saved["results"]) == set(result)
    assert {"fp16", "kivi@36", "logquant@36"} <= set(result) | {"fp16"}
    if argv[0] == "ppl":
        assert result["fp16"]["top1_agreement"] == 1.0 and result["fp16"]["ppl"] > 1.0
    if argv[0] == "agreement":
        assert result["fp16"]["agreement"] == 1.0
    assert saved["provenance"]["command"].startswith("python")
    assert saved["provenance"]["model"]["name"] == "SmolLM2-135M-Instruct"
