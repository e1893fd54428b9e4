"""Batched answer generation for LlarvaPolicy.

`generate_text` is the one entry point `LlarvaPolicy.predict` uses. This first version is
transformers' greedy `generate`; the fast path (static cache, captured decode step, forced answer
characters) plugs in behind the same signature.
"""

from __future__ import annotations

import torch


@torch.inference_mode()
def generate_text(loaded, inputs, *, max_new_tokens: int = 128, logits_processor=None) -> list[str]:
    """Greedy answers for a left-padded batch of processor outputs (`input_ids`, `attention_mask`,
    `pixel_values`); returns the decoded new text of each row, special tokens removed."""
    tokenizer = loaded.tokenizer
    output = loaded.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                   logits_processor=logits_processor,
                                   pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    new_tokens = output[:, inputs["input_ids"].shape[1]:]
    return tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
