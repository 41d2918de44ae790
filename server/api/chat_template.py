"""Chat messages -> prompt token ids through the model's chat template."""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from server.api.errors import APIError
from server.api.protocol import ChatMessage


def template_messages(messages: list[ChatMessage]) -> list[dict]:
    """Messages as the chat template expects them (developer -> system, text parts joined)."""
    out = []
    for m in messages:
        message = {"role": m.role if m.role != "developer" else "system", "content": m.text()}
        out.append(message | ({"name": m.name} if m.name else {}))
    return out


def render_chat(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[ChatMessage],
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
) -> list[int]:
    if add_generation_prompt and continue_final_message:
        raise APIError(400, "add_generation_prompt and continue_final_message cannot both be true",
                       param="continue_final_message")  # fmt: skip
    try:
        ids = tokenizer.apply_chat_template(
            template_messages(messages),
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            tokenize=True,
            return_dict=False,
        )
    except Exception as exc:  # template errors come from user content (e.g. role order)
        raise APIError(400, f"cannot apply the chat template: {exc}", param="messages") from exc
    return list(ids)
