"""Evaluation tools: python -m logquant.eval {coverage,ppl,agreement,passkey}."""
