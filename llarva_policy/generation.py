"""Batched answer generation for LlarvaPolicy: transformers' `generate`, or a fast path.

`generate_text` is the one entry point `LlarvaPolicy.predict` uses. It has two engines:

* "hf": transformers' greedy `generate` (dynamic KV cache, one Python-driven forward per token).
* "fast": `FastGenerator`, built for the shape of a LLARVA step, a batch of long multimodal prompts
  and short answers:
    1. prefill once, batched: the vision tower and projector (the model's own code) make the
       image features, which take the image tokens' places among the prompt's embeddings; the
       prompt then goes through the LANGUAGE MODEL (`model.model.language_model` + `model.lm_head`)
       in code written here, which puts its K/V straight into preallocated tensors of fixed length
       (a static cache); prompts are left-padded to a multiple of 64 tokens, so that on CUDA a
       compiled prefill serves many prompt lengths;
    2. each new token is one decode step of the language model only, with fixed shapes, so that on
       CUDA it is captured once per batch size as a CUDA graph and replayed (on CPU the same code
       runs eagerly).
  Greedy tokens are the same as `generate`'s (tests/test_generation.py checks it on batches of
  left-padded prompts of different lengths).

Constrained decoding (`constrained=True`, either engine): the answer must be
`The next action step: [n1, n2, ..., n8]</s>` with every number matching `codec.NUMBER_PATTERN`,
or with `visual_trace=True` `The visual trace of the end effector: [[x1, y1], ..., [xk, yk]]. `
before it (1 to `MAX_TRACE_POINTS` points of non-negative integers, as `codec.format_answer` writes them).
`ActionGrammar` turns that into a token-level automaton over the model's own vocabulary: the
fixed words are forced as the tokenizer writes them after the prompt (the fast path feeds them
with the prompt, in the one prefill forward), and at every later step only the tokens that keep
the text a prefix of a valid answer are allowed, with a budget rule that always leaves room to
close the answer within `max_new_tokens`. So every answer parses (with `expect_trace=visual_trace`),
even from a random model. Where the grammar allows one token only (with LLaMA-style tokenizers:
the "," after a number's fourth decimal, the "]" and EOS that close the action, the space after a
trace point's ","), the fast path feeds it in the decode forward of the token before it: the same
tokens in fewer sequential forwards (`FastGenerator`, `multi_token`).

All decoding here is greedy (LLARVA evaluates greedily).
"""

from __future__ import annotations

import os
import re
import warnings
import copy
from collections import deque
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import LogitsProcessor, LogitsProcessorList

from llarva_policy import codec

METHODS = ("auto", "hf", "fast")


@torch.inference_mode()
def generate_text(loaded, inputs, *, max_new_tokens: int = 128, logits_processor=None, method: str = "auto",
                  constrained: bool = False, template=codec.TRAINING, visual_trace: bool = False) -> list[str]:
    """Greedy answers for a left-padded batch of processor outputs (`input_ids`, `attention_mask`,
    `pixel_values`); returns the decoded new text of each row, special tokens removed.

    `method`: "hf" (transformers' `generate`), "fast" (`FastGenerator`: static cache, CUDA graphs
    on CUDA, eager on CPU) or "auto": "fast" on CUDA when the model is supported and no
    `logits_processor` is given, else "hf" (so CPU behaviour is `generate`'s).
    `constrained`: force the answer's form (`ActionGrammar` for `template`): an action, or with
    `visual_trace=True` (prompts that ask for one) a visual trace then an action. `visual_trace`
    only picks the grammar; unconstrained decoding writes whatever the model writes.
    """
    method = resolve_method(method, loaded, logits_processor)
    if method == "fast":
        new_tokens = fast_generator_for(loaded).generate(
            inputs, max_new_tokens=max_new_tokens, logits_processor=logits_processor,
            constrained=constrained, template=template, visual_trace=visual_trace)
    else:
        new_tokens = _generate_hf(loaded, inputs, max_new_tokens=max_new_tokens, logits_processor=logits_processor,
                                  constrained=constrained, template=template, visual_trace=visual_trace)
    return loaded.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)


def resolve_method(method: str, loaded, logits_processor=None) -> str:
    """"hf" or "fast" for `method` (see `generate_text`); "fast" on an unsupported model is an error."""
    if method not in METHODS:
        raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
    if method == "hf":
        return method
    problem = fast_path_problem(loaded.model)
    if method == "auto":
        use_fast = problem is None and logits_processor is None and loaded.model.device.type == "cuda"
        return "fast" if use_fast else "hf"
    if problem is not None:
        raise ValueError(f"method='fast' cannot run this model: {problem}; use method='hf'")
    return method


def _generate_hf(loaded, inputs, *, max_new_tokens, logits_processor, constrained, template,
                 visual_trace=False) -> torch.Tensor:
    tokenizer = loaded.tokenizer
    logits_processor = _processor_list(logits_processor)
    if constrained:
        grammar = action_grammar_for(loaded, template, visual_trace=visual_trace)
        grammar_processor = ActionLogitsProcessor(grammar, inputs["input_ids"].shape[1], max_new_tokens)
        logits_processor = LogitsProcessorList([*(logits_processor or []), grammar_processor])
    output = loaded.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                   logits_processor=logits_processor,
                                   pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    return output[:, inputs["input_ids"].shape[1]:]


def _processor_list(logits_processor) -> LogitsProcessorList | None:
    """None, one processor, or a list of them -> None or a LogitsProcessorList."""
    if logits_processor is None or isinstance(logits_processor, LogitsProcessorList):
        return logits_processor
    if isinstance(logits_processor, (list, tuple)):
        return LogitsProcessorList(logits_processor)
    return LogitsProcessorList([logits_processor])


# ---------------------------------------------------------------------------------------------
# Constrained decoding: the action answer as a token automaton
# ---------------------------------------------------------------------------------------------

_DIGITS = "0123456789"
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")   # LLaMA's byte-fallback tokens
MAX_INTEGER_DIGITS = 3     # |value| < 1000: joint velocities are a few rad/s, the gripper 0 or 1
MAX_TRACE_POINTS = 64      # annotations write 30 points (annotations.TRACE_POINTS), fewer if asked
MAX_COORDINATE_DIGITS = 4  # pixel positions up to 9999


@dataclass
class ActionGrammar:
    """`template.action_prefix + "[" + 8 numbers + "]" + EOS` as a table over token ids, optionally
    after a visual trace: `template.trace_prefix + "[[x1, y1], ..., [xk, yk]]" + template.trace_suffix`.

    States 0 .. len(forced_ids)-1 each allow one token (the fixed words, tokenized in context after
    the prompt); `after_forced` is the state once they are in. `next_state[s, t]` is the state after
    token t in state s, or -1 where t is not allowed. `tokens_to_finish[s]` is the fewest tokens
    from s to the end of the answer, EOS included: a token is allowed only if what is left of
    `max_new_tokens` still covers that, so the answer always closes in time.
    `forced_token[s]` is the one token state s allows (the "," after a number's fourth decimal, the
    "]" and EOS that close the action, ...) and `forced_next[s]` the state after it, or -1 for both
    where s allows a choice: the fast path feeds such tokens in the decode step of the token
    before them.
    """

    forced_ids: list[int]
    next_state: torch.Tensor        # (num_states, vocab) int64, -1 = not allowed
    tokens_to_finish: torch.Tensor  # (num_states,) int64
    finished_state: int
    forced_token: torch.Tensor      # (num_states,) int64, -1 = a choice
    forced_next: torch.Tensor       # (num_states,) int64, -1 = a choice

    @property
    def after_forced(self) -> int:
        return len(self.forced_ids)

    @property
    def min_new_tokens(self) -> int:
        """The shortest answer, in tokens: `max_new_tokens` below this cannot hold an answer."""
        return int(self.tokens_to_finish[0])

    def to(self, device) -> ActionGrammar:
        return ActionGrammar(self.forced_ids, self.next_state.to(device), self.tokens_to_finish.to(device),
                             self.finished_state, self.forced_token.to(device), self.forced_next.to(device))

    def mask(self, scores: torch.Tensor, states: torch.Tensor, tokens_left) -> torch.Tensor:
        """`scores` (B, vocab) with every token not allowed in `states` (B,) set to -inf.
        `tokens_left` (an int, or a (B,) tensor: one per row): how many tokens may still be
        generated, this one included."""
        if isinstance(tokens_left, torch.Tensor):
            tokens_left = tokens_left[:, None]
        next_states = self.next_state[states]                              # (B, vocab)
        steps_after = self.tokens_to_finish[next_states.clamp(min=0)]
        allowed = (next_states >= 0) & (steps_after <= tokens_left - 1)
        return scores.masked_fill(~allowed[:, :scores.shape[1]], float("-inf"))

    def advance(self, states: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return self.next_state[states, tokens]


def build_action_grammar(tokenizer, vocab_size: int, *, template=codec.TRAINING,
                         max_integer_digits: int = MAX_INTEGER_DIGITS, visual_trace: bool = False,
                         max_trace_points: int = MAX_TRACE_POINTS,
                         max_coordinate_digits: int = MAX_COORDINATE_DIGITS) -> ActionGrammar:
    """The `ActionGrammar` of `template`'s action answer for this tokenizer and a model whose
    logits have `vocab_size` columns (at least the tokenizer's size).

    `visual_trace=True`: the answer starts with a visual trace of 1 to `max_trace_points` points,
    written as `codec.format_answer` writes it (non-negative integers of up to
    `max_coordinate_digits` digits, no leading zeros, ", " between numbers and points).
    """
    template = codec.get_template(template)
    for name, value in (("max_trace_points", max_trace_points), ("max_coordinate_digits", max_coordinate_digits)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: expected an int >= 1, got {value!r}")
    eos_id = tokenizer.eos_token_id
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id
    if eos_id is None:
        raise ValueError("constrained decoding needs a tokenizer with an eos_token (the answer ends with it)")
    # The answer follows "ASSISTANT:" after one space. With a trace, the fixed words end at the
    # first point's "[" and the words between the trace and the action are a second literal.
    if visual_trace:
        prefix = " " + template.trace_prefix + "[["
        between = template.trace_suffix + template.action_prefix + "["   # after the trace's closing "]"
        first_texts = tuple(_DIGITS) + ("10", "1023")
    else:
        prefix = " " + template.action_prefix + "["
        between = ""
        first_texts = ("0", "-0", "1.5")

    # The fixed words, as the tokenizer writes them after a prompt. Only the tokens common to every
    # way an answer can go on are forced: the last one may merge with what follows ("▁[" + "-" is
    # written "▁[-" by LLaMA-style tokenizers), and is left to the character automaton below.
    prompt = codec.build_prompt("x", template=template)     # every prompt ends "... ASSISTANT:"
    prompt_ids = tokenizer.encode(prompt)
    variants = [tokenizer.encode(prompt + prefix + first) for first in first_texts]
    common = []
    for column in zip(*variants):
        if len(set(column)) > 1:
            break
        common.append(column[0])
    forced_ids = common[len(prompt_ids):] if common[:len(prompt_ids)] == prompt_ids else []
    plain = dict(clean_up_tokenization_spaces=False)     # keep " ," and " ." as the tokens write them
    prompt_text = tokenizer.decode(prompt_ids, **plain)
    forced_text = tokenizer.decode(prompt_ids + forced_ids, **plain)[len(prompt_text):]
    if not prefix.startswith(forced_text):   # a tokenizer whose decode does not round-trip: force nothing
        forced_ids, forced_text = [], ""
    literal = prefix[len(forced_text):]      # the fixed characters the automaton still has to see

    # What each token adds to the text, read in context (after a digit): decoders drop a leading
    # space at the start of a text, and "▁-" must read " -".
    anchor = tokenizer.encode("0", add_special_tokens=False)[-1]
    anchor_text = tokenizer.decode([anchor], **plain)
    surfaces = tokenizer.batch_decode([[anchor, t] for t in range(len(tokenizer))], **plain)
    alphabet = set(literal) | set(between) | set(_DIGITS + "-., ]") | (set("[") if visual_trace else set())
    special_ids = set(tokenizer.all_special_ids)
    candidates = {}                          # token id -> surface
    for token_id, text in enumerate(surfaces):
        surface = text[len(anchor_text):] if text.startswith(anchor_text) else None
        if surface and set(surface) <= alphabet and token_id not in special_ids:
            candidates[token_id] = surface
    # Byte-fallback tokens ("<0x2C>" for ",") spell a character a second way, which the tokenizer
    # never writes for a character that has a token of its own. Leaving those out changes no text
    # the grammar accepts, only a spelling no trained model uses, and it makes the separators
    # forced tokens (one allowed token), which the fast path feeds without a decode step of their own.
    byte_fallback = {token_id for token_id in candidates
                     if _BYTE_TOKEN.fullmatch(tokenizer.convert_ids_to_tokens(token_id) or "")}
    spelled_otherwise = {surface for token_id, surface in candidates.items() if token_id not in byte_fallback}
    by_first_char = {}                       # the candidate tokens (id, surface), by their first character
    for token_id, surface in candidates.items():
        if not (token_id in byte_fallback and surface in spelled_otherwise):
            by_first_char.setdefault(surface[0], []).append((token_id, surface))

    # Character automaton over `literal`, the trace, `between` and the numbers; states are
    # (kind, count, digits) tuples, numbered below. In a trace `count` is the point's index: it is
    # what bounds the points, so it is carried through the point, with only the digit count of
    # the coordinate being written (no more states than the bound needs).
    after_literal = ("x", 0, 0) if visual_trace else ("start", 0, 0)

    def coordinate_digit(kind, p, k, ch):
        # A coordinate is written as str(int): no leading zero, so a first "0" ends it.
        if ch not in _DIGITS:
            return None
        if k == 0:
            return (kind, p, max_coordinate_digits if ch == "0" else 1)
        return (kind, p, k + 1) if k < max_coordinate_digits else None

    def after(state, ch):
        kind, n, k = state
        if kind == "literal":
            if ch != literal[k]:
                return None
            return ("literal", 0, k + 1) if k + 1 < len(literal) else after_literal
        # --- the visual trace: "[[x, y], [x, y]]", n = the point's index, k = digits so far
        if kind == "x":
            return ("x_comma", n, 0) if ch == "," and k > 0 else coordinate_digit("x", n, k, ch)
        if kind == "x_comma":                            # after "x,": a space, then y
            return ("y", n, 0) if ch == " " else None
        if kind == "y":
            return ("closed", n, 0) if ch == "]" and k > 0 else coordinate_digit("y", n, k, ch)
        if kind == "closed":                             # after the point's "]": another point, or the end
            if ch == "," and n + 1 < max_trace_points:
                return ("comma", n, 0)
            return ("between", 0, 0) if ch == "]" else None
        if kind == "comma":                              # after "],": a space, then the next point's "["
            return ("gap", n, 0) if ch == " " else None
        if kind == "gap":
            return ("x", n + 1, 0) if ch == "[" else None
        if kind == "between":                            # the trace suffix and the action prefix
            if ch != between[k]:
                return None
            return ("between", 0, k + 1) if k + 1 < len(between) else ("start", 0, 0)
        # --- the action: 8 numbers, n = the number's index, k = digits so far
        if kind == "space":                              # after ",": a space, then the next number
            return ("start", n, 0) if ch == " " else None
        if kind == "start":
            return ("sign", n, 0) if ch == "-" else ("integer", n, 1) if ch in _DIGITS else None
        if kind == "sign":
            return ("integer", n, 1) if ch in _DIGITS else None
        if kind == "integer":                            # k integer digits so far
            if ch in _DIGITS and k < max_integer_digits:
                return ("integer", n, k + 1)
            return ("decimals", n, 0) if ch == "." else None
        if kind == "decimals":                           # k decimals so far
            if ch in _DIGITS and k < codec.DECIMALS:
                return ("decimals", n, k + 1)
            if k == 0:
                return None
            if ch == codec.NUMBER_SEPARATOR[0] and n < codec.ACTION_SIZE - 1:
                return ("space", n + 1, 0)
            if ch == codec.ANSWER_CLOSE and n == codec.ACTION_SIZE - 1:
                return ("done", 0, 0)
        return None                                      # "done" takes no more characters, only EOS

    def after_token(state, surface):
        for ch in surface:
            state = after(state, ch)
            if state is None:
                return None
        return state

    assert codec.NUMBER_SEPARATOR == ", ", "the automaton writes the separator as ',' then ' '"
    first = ("literal", 0, 0) if literal else after_literal
    number_of = {first: len(forced_ids)}
    edges = {}                                           # (state number, token) -> state number
    frontier = [first]
    while frontier:
        state = frontier.pop()
        # Only tokens whose first character can follow are tried; in id order, so that states are
        # numbered the same from run to run.
        tried = sorted(token for ch in alphabet if after(state, ch) is not None for token in by_first_char.get(ch, ()))
        for token_id, surface in tried:
            target = after_token(state, surface)
            if target is None:
                continue
            if target not in number_of:
                number_of[target] = len(forced_ids) + len(number_of)
                frontier.append(target)
            edges[number_of[state], token_id] = number_of[target]
    if ("done", 0, 0) not in number_of:
        what = "an answer with a visual trace" if visual_trace else "an action answer"
        raise ValueError(f"the tokenizer cannot write {what} ({prefix.strip()!r} + numbers): "
                         f"no tokens for digits, '.', ', ' or ']'{', [' if visual_trace else ''}")
    done = number_of[("done", 0, 0)]
    finished = len(forced_ids) + len(number_of)
    edges[done, eos_id] = finished
    edges[finished, eos_id] = edges[finished, pad_id] = finished   # generate pads rows that have ended
    for i, token_id in enumerate(forced_ids):
        edges[i, token_id] = i + 1

    num_states = finished + 1
    next_state = torch.full((num_states, max(vocab_size, len(tokenizer))), -1, dtype=torch.long)
    predecessors = [set() for _ in range(num_states)]
    for (state, token_id), target in edges.items():
        next_state[state, token_id] = target
        if state != finished:
            predecessors[target].add(state)
    # Fewest tokens to the end: a breadth-first search back from the finished state.
    unreachable = 10**9
    to_finish = [unreachable] * num_states
    to_finish[finished] = 0
    queue = deque([finished])
    while queue:
        target = queue.popleft()
        for state in predecessors[target]:
            if to_finish[state] == unreachable:
                to_finish[state] = to_finish[target] + 1
                queue.append(state)
    # The states that allow one token only. The finished state is not one (it ends the answer),
    # even where the tokenizer's pad token is its EOS.
    outgoing = [[] for _ in range(num_states)]
    for (state, token_id), target in edges.items():
        outgoing[state].append((token_id, target))
    forced_token = torch.full((num_states,), -1, dtype=torch.long)
    forced_next = torch.full((num_states,), -1, dtype=torch.long)
    for state, choices in enumerate(outgoing):
        if len(choices) == 1 and state != finished:
            forced_token[state], forced_next[state] = choices[0]
    return ActionGrammar(forced_ids, next_state, torch.tensor(to_finish), finished, forced_token, forced_next)


def action_grammar_for(loaded, template=codec.TRAINING, *, visual_trace: bool = False) -> ActionGrammar:
    """`build_action_grammar` for a loaded model, built once per template (and with or without a
    visual trace) and kept with it."""
    template = codec.get_template(template)
    grammars = loaded.__dict__.setdefault("_action_grammars", {})
    key = (template.name, bool(visual_trace))
    if key not in grammars or grammars[key][0] != template:
        grammar = build_action_grammar(loaded.tokenizer, loaded.model.config.text_config.vocab_size,
                                       template=template, visual_trace=visual_trace).to(loaded.model.device)
        grammars[key] = (template, grammar)
    return grammars[key][1]


def _check_room(grammar: ActionGrammar, max_new_tokens: int) -> None:
    if max_new_tokens < grammar.min_new_tokens:
        raise ValueError(f"max_new_tokens={max_new_tokens} is too small for a constrained answer: "
                         f"it needs at least {grammar.min_new_tokens} tokens")


class ActionLogitsProcessor(LogitsProcessor):
    """`ActionGrammar` for transformers' `generate` (one instance per call: it keeps the states)."""

    def __init__(self, grammar: ActionGrammar, prompt_length: int, max_new_tokens: int):
        _check_room(grammar, max_new_tokens)
        self.grammar, self.prompt_length, self.max_new_tokens = grammar, prompt_length, max_new_tokens
        self.states = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        generated = input_ids.shape[1] - self.prompt_length
        if generated == 0:
            self.states = torch.zeros(len(input_ids), dtype=torch.long, device=scores.device)
        else:
            self.states = self.grammar.advance(self.states, input_ids[:, -1])
        return self.grammar.mask(scores, self.states, self.max_new_tokens - generated)


# ---------------------------------------------------------------------------------------------
# The fast path
# ---------------------------------------------------------------------------------------------

def fast_path_problem(model) -> str | None:
    """Why `FastGenerator` cannot run `model`, or None if it can (a LLaVA over a Llama-style LM)."""
    language_model = getattr(getattr(model, "model", None), "language_model", None)
    if language_model is None or not hasattr(model, "lm_head"):
        return f"{type(model).__name__} has no model.language_model and lm_head (expected a LLaVA model)"
    if not hasattr(model, "get_image_features"):
        return f"{type(model).__name__} has no get_image_features (expected a LLaVA model)"
    needed = ("embed_tokens", "layers", "norm", "rotary_emb")
    if not all(hasattr(language_model, name) for name in needed):
        return f"the language model {type(language_model).__name__} is not Llama-shaped (needs {needed})"
    layer = language_model.layers[0]
    parts = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp",
             "input_layernorm", "post_attention_layernorm")
    missing = [part for part in parts if not _has_submodule(layer, part)]
    if missing:
        return f"the decoder layer {type(layer).__name__} is not Llama-shaped (it has no {missing})"
    config = language_model.config
    rope_type = (getattr(config, "rope_parameters", None) or {}).get("rope_type", "default")
    if rope_type in ("dynamic", "longrope"):
        return f"rope_type {rope_type!r} changes with the sequence length"
    layer_types = getattr(config, "layer_types", None) or []
    if getattr(config, "sliding_window", None) or any(t != "full_attention" for t in layer_types):
        return "sliding-window attention is not supported"
    return None


def _has_submodule(module, path: str) -> bool:
    try:
        module.get_submodule(path)
        return True
    except AttributeError:
        return False


PREFILL_LENGTH_MULTIPLE = 64         # prompts are padded to a multiple of this many tokens
COMPILE_ENV = "LLARVA_FAST_COMPILE"   # "0": never torch.compile the decode step or the prefill


def fast_generator_for(loaded) -> FastGenerator:
    """The `FastGenerator` of a loaded model: one, kept with it, as it holds the static caches and
    graphs (for 7B, 0.5 MB per cache slot and row: about 8 GB at batch 16 and 1,024 slots).
    `fast_generator_for(loaded).release()` frees them. On CUDA the decode steps and the prefill are
    compiled (H100, 7B: 6.5 instead of 8.4 ms a token; for 7B about 40 s once per batch size and
    step width, and once per padded prompt length for the prefill); LLARVA_FAST_COMPILE=0 opts out."""
    generator = loaded.__dict__.get("_fast_generator")
    if generator is None:
        compile_step = loaded.device.type == "cuda" and os.environ.get(COMPILE_ENV, "1") != "0"
        generator = loaded.__dict__["_fast_generator"] = FastGenerator(loaded, compile=compile_step)
    return generator


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


class _DecodeStep:
    """Everything one decode step of `width` tokens per row for batch size B reads and writes, at
    fixed addresses (what a CUDA graph replays), its own static K/V cache included: one whole
    tensor per layer, which a compiled step updates in place."""

    def __init__(self, batch: int, width: int, capacity: int, vocab_size: int, cache_shape: tuple, dtype, device):
        num_layers, kv_heads, head_dim = cache_shape
        self.keys = [torch.zeros(batch, kv_heads, capacity, head_dim, dtype=dtype, device=device)
                     for _ in range(num_layers)]
        self.values = [torch.zeros_like(keys) for keys in self.keys]
        self.token_ids = torch.zeros(batch, width, dtype=torch.long, device=device)  # the tokens to feed
        self.slot = torch.zeros((), dtype=torch.long, device=device)               # the first one's cache slot
        self.skipped = torch.zeros(batch, dtype=torch.long, device=device)         # masked slots before it, per row
        self.valid = torch.ones(batch, capacity, dtype=torch.bool, device=device)  # False on masked slots
        self.logits = torch.zeros(batch, vocab_size, dtype=torch.float32, device=device)
        self.last = torch.zeros(batch, dtype=torch.long, device=device)   # each row's last real token in the chunk
        self.graph: torch.cuda.CUDAGraph | None = None
        self.ready = False           # captured, or compiled, for this shape

    def widened(self, width: int) -> _DecodeStep:
        """A step that feeds `width` tokens per row into this step's cache (the same K/V, slot and
        mask tensors), with its own inputs, logits and graph."""
        wide = copy.copy(self)
        wide.token_ids = torch.zeros(self.token_ids.shape[0], width, dtype=torch.long, device=self.token_ids.device)
        wide.logits = torch.zeros_like(self.logits)
        wide.last = torch.zeros_like(self.last)
        wide.graph = None
        wide.ready = False
        return wide


class FastGenerator:
    """Greedy batched decoding with a static KV cache and, on CUDA, a CUDA-graph decode step.

    Cache layout: slot j of row b holds the j-th token of the left-padded input (prompt, then
    generated tokens), so every row writes its next token to the same slot and one graph serves a
    batch; masked slots (the padding) are never attended to, and each row's rotary position is its
    slot minus its masked slots before it. Each batch size gets its own K/V tensors and graph, kept
    for later calls; all of them are rebuilt, longer, only when an input no longer fits (lengths
    are rounded up to 128 slots).

    `use_cuda_graphs=None`: on CUDA devices. `compile=True` also runs the decode steps through
    `torch.compile` (fused kernels) before capture, and the prefill's language model; each new
    batch size, step width, cache length or padded prompt length then compiles again (about a
    minute for 7B). If capture or compilation fails, the generator goes on eagerly and says why in
    `fallback_reason` (and a warning).

    Multi-token decoding (constrained): where the grammar forces the tokens after the chosen one
    (the "," after a fourth decimal, "]" and EOS), they go into the same decode forward,
    through a second step of `multi_token_width` tokens per row over the same cache (its own
    graph). Rows force different runs: a row's chunk is padded on the right, and those slots are
    masked, as the left padding is, so every row attends to exactly the tokens it would one token
    a forward. Greedy tokens are the one-token step's; `last_decode_steps` counts the sequential
    decode forwards of the last call. A wider step reads the weights once, as a one-token step
    does, but the cache grows by `multi_token_width` slots a step, all of which every step reads.
    Measured (H200, 7B, 64-token answers, benchmarks/results/policy_latency_fast_7b_h200.json):
    at batch 1 it saves 8 of 59 forwards and is 3% faster; at batch 16 a wide step costs 8.8
    instead of 7.0 ms and the call is 4% slower. So `generate` uses it at batch 1 unless told.

    A captured graph reads the weights where they were at capture: in-place updates are seen, but
    after replacing parameter tensors (loading or merging other weights) call `release()`.
    """

    def __init__(self, loaded, *, use_cuda_graphs: bool | None = None, compile: bool = False,
                 multi_token_width: int = 3):
        problem = fast_path_problem(loaded.model)
        if problem is not None:
            raise ValueError(f"FastGenerator cannot run this model: {problem}")
        if isinstance(multi_token_width, bool) or not isinstance(multi_token_width, int) or multi_token_width < 2:
            raise ValueError(f"multi_token_width: expected an int >= 2, got {multi_token_width!r}")
        self.multi_token_width = multi_token_width
        self.loaded = loaded
        self.model = loaded.model
        self.language_model = loaded.model.model.language_model
        self.lm_head = loaded.model.lm_head
        self.device, self.dtype = loaded.model.device, loaded.model.dtype
        self.use_cuda_graphs = self.device.type == "cuda" if use_cuda_graphs is None else use_cuda_graphs
        if self.use_cuda_graphs and self.device.type != "cuda":
            raise ValueError(f"use_cuda_graphs=True needs a CUDA model, this one is on {self.device}")
        self.fallback_reason: str | None = None
        self._forward, self._prefill_forward = self._decode_forward, self._prefill_eager
        if compile:
            self._forward = torch.compile(self._decode_forward, dynamic=False)
            self._prefill_forward = torch.compile(self._prefill_eager, dynamic=False)
        self.compiled = compile
        self._capacity = 0                     # cache slots of every step: prompt + new tokens fit
        self._cos = self._sin = None           # (capacity, head_dim) rotary tables, by position
        self._slot_ids = None
        self._steps: dict[int, _DecodeStep] = {}        # one-token steps, by batch size
        self._wide_steps: dict[int, _DecodeStep] = {}   # `multi_token_width` tokens, over _steps[batch]'s cache
        self.last_decode_steps = 0             # sequential decode forwards (after the prefill) of the last call

    @property
    def mode(self) -> str:
        """How decode steps run now: "cuda-graph", "cuda-graph+compile", "eager" or "eager+compile"."""
        return ("cuda-graph" if self.use_cuda_graphs else "eager") + ("+compile" if self.compiled else "")

    @property
    def capacity(self) -> int:
        return self._capacity

    def release(self) -> None:
        """Free the static caches and the graphs (they are rebuilt on the next `generate`)."""
        self._steps.clear()
        self._wide_steps.clear()
        self._capacity = 0
        self._cos = self._sin = self._slot_ids = None

    # --- generation --------------------------------------------------------------------------

    @torch.inference_mode()
    def generate(self, inputs, *, max_new_tokens: int = 128, constrained: bool = False, template=codec.TRAINING,
                 visual_trace: bool = False, logits_processor=None, ignore_eos: bool = False,
                 multi_token: bool | None = None) -> torch.Tensor:
        """The new tokens of each row, (B, n <= max_new_tokens), padded after EOS: `generate`'s
        output without the prompt. `ignore_eos`: never stop (benchmarks of fixed-length answers).
        `constrained`, `template`, `visual_trace`: as `generate_text`'s.
        `logits_processor` (transformers' processors) runs eagerly on each step's logits.
        `multi_token`: feed each token's forced run in its decode forward (see the class; same
        tokens, fewer forwards): it needs `constrained`, no `logits_processor` (it would not see the
        forced tokens' scores) and no `ignore_eos`. None: at batch 1 only, where it is faster (see
        the class); False: one token a forward."""
        input_ids = inputs["input_ids"].to(self.device)
        attention_mask = inputs.get("attention_mask")
        attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(self.device)
        _check_left_padded(attention_mask)
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens: expected a positive int, got {max_new_tokens!r}")
        extra = {key: value.to(self.device, self.dtype if value.is_floating_point() else value.dtype)
                 for key, value in inputs.items() if key not in ("input_ids", "attention_mask")}
        logits_processor = _processor_list(logits_processor)
        tokenizer = self.loaded.tokenizer
        eos_id = tokenizer.eos_token_id
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id
        batch = input_ids.shape[0]
        can_multi_token = constrained and logits_processor is None and not ignore_eos
        if multi_token is None:
            multi_token = can_multi_token and batch == 1
        elif not isinstance(multi_token, bool):
            raise ValueError(f"multi_token: expected True, False or None, got {multi_token!r}")
        elif multi_token and not can_multi_token:
            raise ValueError(f"multi_token=True: needs constrained=True, no logits_processor and ignore_eos=False; "
                             f"got constrained={constrained}, logits_processor={logits_processor!r}, "
                             f"ignore_eos={ignore_eos}")

        forced = torch.empty(batch, 0, dtype=torch.long, device=self.device)
        grammar = states = None
        if constrained:
            grammar = action_grammar_for(self.loaded, template, visual_trace=visual_trace)
            _check_room(grammar, max_new_tokens)
            # The fixed words go in with the prompt: one forward for all of them.
            forced = torch.tensor(grammar.forced_ids, dtype=torch.long, device=self.device).expand(batch, -1)
            input_ids = torch.cat([input_ids, forced], dim=1)
            attention_mask = torch.cat([attention_mask, torch.ones_like(forced)], dim=1)
            states = torch.full((batch,), grammar.after_forced, dtype=torch.long, device=self.device)
        # A compiled prefill is specialised to the prompt's length: padding it to a multiple of 64
        # (on the left, masked like the rest of the padding) means few lengths ever compile.
        extra_padding = _round_up(input_ids.shape[1], PREFILL_LENGTH_MULTIPLE) - input_ids.shape[1]
        input_ids = F.pad(input_ids, (extra_padding, 0), value=pad_id)
        attention_mask = F.pad(attention_mask, (extra_padding, 0), value=0)
        prompt_length = input_ids.shape[1]
        to_generate = max_new_tokens - forced.shape[1]
        width = self.multi_token_width if multi_token else 1

        # Every step takes `width` slots and each unfinished row at least one new token: room for all.
        step = self._prepare(batch, prompt_length + width * to_generate, width)
        step.valid[:, :prompt_length].copy_(attention_mask.bool())
        step.valid[:, prompt_length:] = False
        step.skipped.copy_((attention_mask == 0).sum(dim=1))
        logits = self._prefill(step, self._prompt_embeddings(input_ids, extra))
        step.slot.fill_(prompt_length)
        self.last_decode_steps = 0

        # Row b's answer so far is tokens[b, :written[b]]; the buffer has room for a chunk past the end.
        tokens = torch.full((batch, to_generate + width), pad_id, dtype=torch.long, device=self.device)
        written = torch.zeros(batch, dtype=torch.long, device=self.device)
        finished = torch.zeros(batch, dtype=torch.bool, device=self.device)
        offsets = torch.arange(width, device=self.device)
        chunk = torch.full((batch, width), pad_id, dtype=torch.long, device=self.device)
        while True:
            scores = logits
            if logits_processor is not None:
                scores = logits_processor(torch.cat([input_ids, tokens[:, :int(written.max())]], dim=1), scores)
            if ignore_eos:
                scores = scores.clone()
                scores[:, eos_id] = float("-inf")
            if grammar is not None:
                scores = grammar.mask(scores, states, to_generate - written)
            chunk[:, 0] = torch.where(finished, pad_id, scores.argmax(dim=-1))
            counts = (~finished).long()                 # real tokens in each row's chunk
            if grammar is not None:
                states = torch.where(finished, states, grammar.advance(states, chunk[:, 0]))
                for i in range(1, width):               # then the tokens the grammar allows alone, in budget
                    follows = grammar.forced_token[states]
                    takes = (counts == i) & (follows >= 0) & (written + i < to_generate)
                    chunk[:, i] = torch.where(takes, follows, pad_id)
                    states = torch.where(takes, grammar.forced_next[states], states)
                    counts += takes
            tokens.scatter_(1, written[:, None] + offsets, chunk)
            written += counts
            if not ignore_eos:
                finished |= ((chunk == eos_id) & (offsets < counts[:, None])).any(dim=1)
            finished |= written >= to_generate
            if bool(finished.all()):                    # the one sync per step
                break
            step.token_ids.copy_(chunk)
            step.last.copy_((counts - 1).clamp(min=0))
            real = offsets < counts[:, None]            # a row's padding in the chunk: slots no one attends to
            step.valid.index_copy_(1, step.slot + offsets, real)
            self._run(step)
            self.last_decode_steps += 1
            step.skipped.add_(width - counts)
            step.slot.add_(width)
            logits = step.logits
        return torch.cat([forced, tokens[:, :int(written.max())]], dim=1)

    def _prompt_embeddings(self, input_ids, extra) -> torch.Tensor:
        """The language model's input for the prompt: its token embeddings, with the image features
        (vision tower and projector, the model's own code) in place of the image tokens."""
        embeddings = self.language_model.embed_tokens(input_ids)
        pixel_values = extra.pop("pixel_values", None)
        if pixel_values is None:
            return embeddings
        features = self.model.get_image_features(pixel_values=pixel_values, **extra)
        features = getattr(features, "pooler_output", features)      # transformers 5.x: an output object
        if isinstance(features, (list, tuple)):
            features = torch.cat([f.reshape(-1, f.shape[-1]) for f in features])
        features = features.reshape(-1, embeddings.shape[-1])
        is_image = input_ids == self.model.config.image_token_id
        if int(is_image.sum()) != features.shape[0]:
            raise ValueError(f"input_ids: {int(is_image.sum())} image tokens for {features.shape[0]} image features; "
                             "build the inputs with the model's processor")
        return embeddings.masked_scatter(is_image[..., None], features.to(embeddings.dtype))

    def _prefill(self, step: _DecodeStep, embeddings: torch.Tensor) -> torch.Tensor:
        try:
            return self._prefill_forward(step, embeddings)
        except Exception as err:
            if not self.compiled:
                raise
            self._give_up_compile(err)
            return self._prefill_forward(step, embeddings)

    def _prefill_eager(self, step: _DecodeStep, embeddings: torch.Tensor) -> torch.Tensor:
        """The prompt (B, L, hidden) through the language model, its K/V into cache slots 0 .. L-1
        (`step.valid` and `step.skipped` already describe its padding): the logits after it, (B, vocab)
        float32."""
        slots = self._slot_ids[:embeddings.shape[1]]
        hidden = self._layers(step, embeddings, slots, span=embeddings.shape[1])
        return self.lm_head(self.language_model.norm(hidden[:, -1])).float()

    # --- static cache and the decode step --------------------------------------------------------

    def _prepare(self, batch: int, length: int, width: int = 1) -> _DecodeStep:
        """The decode step of `width` tokens (1 or `multi_token_width`) for `batch` rows, the cache
        at least `length` slots long, captured (or compiled) before its first use."""
        if length > self._capacity:
            self._set_capacity(_round_up(length, 128))
        step = self._steps.get(batch)
        if step is None:
            attention = self.language_model.layers[0].self_attn
            cache_shape = (len(self.language_model.layers), attention.k_proj.out_features // attention.head_dim,
                           attention.head_dim)
            step = self._steps[batch] = _DecodeStep(batch, 1, self._capacity, self.lm_head.weight.shape[0],
                                                    cache_shape, self.dtype, self.device)
        if width > 1:
            if batch not in self._wide_steps:
                self._wide_steps[batch] = step.widened(width)
            step = self._wide_steps[batch]
        if not step.ready:
            step.slot.zero_()        # the warm-up writes `width` slots from here: inside the cache
            self._make_ready(step)
            step.ready = True
        return step

    def _make_ready(self, step: _DecodeStep) -> None:
        """Capture (or compile) a new step now, not inside the first timed forward."""
        if self.use_cuda_graphs:
            self._capture(step)
        elif self.compiled:
            self._run(step)

    def _set_capacity(self, capacity: int) -> None:
        self._steps.clear()          # free the old caches (and the graphs that point into them) first
        self._wide_steps.clear()
        self._capacity = capacity
        # cos/sin for every position, from the model's own rotary module (same values as its forward).
        positions = torch.arange(capacity, device=self.device)[None]
        probe = torch.zeros(1, dtype=self.dtype, device=self.device)
        cos, sin = self.language_model.rotary_emb(probe, positions)
        self._cos, self._sin = cos[0], sin[0]
        self._slot_ids = torch.arange(capacity, device=self.device)

    def _decode_forward(self, step: _DecodeStep) -> None:
        """W tokens per row through the language model, their K/V into the static cache from slot
        `step.slot` on, the logits after each row's token `step.last` into `step.logits`. Fixed
        shapes and no host synchronisation: graph-capturable."""
        batch, width = step.token_ids.shape
        slots = step.slot + self._slot_ids[:width]                      # (W,)
        hidden = self._layers(step, self.language_model.embed_tokens(step.token_ids), slots, span=self._capacity)
        if width > 1:
            hidden = hidden.gather(1, step.last[:, None, None].expand(batch, 1, hidden.shape[-1]))   # (B, 1, hidden)
        step.logits.copy_(self.lm_head(self.language_model.norm(hidden))[:, 0])

    def _layers(self, step: _DecodeStep, hidden: torch.Tensor, slots: torch.Tensor, span: int) -> torch.Tensor:
        """`hidden` (B, W, hidden), the tokens of cache slots `slots` (W,), through every decoder
        layer; their K/V go into the cache, and each attends to the unmasked slots before it among
        the first `span`."""
        batch, width = hidden.shape[:2]
        positions = (slots - step.skipped[:, None]).clamp(min=0)        # (B, W); padding: any position
        cos = self._cos[positions][:, None]                             # (B, 1, W, head_dim)
        sin = self._sin[positions][:, None]
        seen = self._slot_ids[:span]
        # Causal over unmasked slots; a token always sees itself, so that no padding row is empty
        # (an all-masked row would make NaN, and its K/V would reach later layers).
        mask = ((step.valid[:, None, :span] & (seen <= slots[:, None])) | (seen == slots[:, None]))[:, None]
        for index, layer in enumerate(self.language_model.layers):
            attention = layer.self_attn
            x = layer.input_layernorm(hidden)
            head_dim = attention.head_dim
            q = attention.q_proj(x).view(batch, width, -1, head_dim).transpose(1, 2)
            k = attention.k_proj(x).view(batch, width, -1, head_dim).transpose(1, 2)
            v = attention.v_proj(x).view(batch, width, -1, head_dim).transpose(1, 2)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            keys, values = step.keys[index], step.values[index]
            keys.index_copy_(2, slots, k)
            values.index_copy_(2, slots, v)
            keys, values = keys[:, :, :span], values[:, :, :span]
            groups = q.shape[1] // keys.shape[1]
            if groups > 1:
                keys, values = keys.repeat_interleave(groups, dim=1), values.repeat_interleave(groups, dim=1)
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=attention.scaling)
            hidden = hidden + attention.o_proj(out.transpose(1, 2).reshape(batch, width, -1))
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        return hidden

    def _run(self, step: _DecodeStep) -> None:
        if step.graph is not None:
            step.graph.replay()
            return
        try:
            self._forward(step)
        except Exception as err:
            if not self.compiled:
                raise
            self._give_up_compile(err)
            self._decode_forward(step)

    def _capture(self, step: _DecodeStep) -> None:
        """Record `step`'s decode forward as a CUDA graph; on failure, run eagerly from now on.

        Runs before the prefill fills the cache: the warm-up writes junk K/V into the slots from
        `step.slot` on, which later writes overwrite before any mask lets them be read.
        """
        try:
            # Warm up on a side stream (cuBLAS handles, lazy inits, compilation), as PyTorch's docs ask.
            stream = torch.cuda.Stream(device=self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                for _ in range(2):
                    self._run(step)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self._forward(step)
            step.graph = graph
        except Exception as err:   # report, then keep going without graphs
            try:
                torch.cuda.synchronize(self.device)
            except Exception:      # noqa: BLE001 - the capture error is the one worth reporting
                pass
            self.use_cuda_graphs = False
            for other in [*self._steps.values(), *self._wide_steps.values()]:
                other.graph = None
            self.fallback_reason = f"CUDA graph capture failed ({type(err).__name__}: {err}); decoding eagerly"
            warnings.warn(self.fallback_reason, RuntimeWarning, stacklevel=3)

    def _give_up_compile(self, err: Exception) -> None:
        self.compiled = False
        self._forward, self._prefill_forward = self._decode_forward, self._prefill_eager
        self.fallback_reason = f"torch.compile of the decode step or prefill failed ({type(err).__name__}: {err}); " \
                               "running it uncompiled"
        warnings.warn(self.fallback_reason, RuntimeWarning, stacklevel=3)


def _check_left_padded(attention_mask: torch.Tensor) -> None:
    # Rows must be [0 ... 0, 1 ... 1]: new tokens go on the right, so padding must be on the left.
    mask = attention_mask.long()
    if not (bool((mask[:, -1] == 1).all()) and bool((mask.diff(dim=1) >= 0).all())):
        raise ValueError("attention_mask: expected left padding (each row zeros then ones, ending in a 1); "
                         "set processor.tokenizer.padding_side = 'left' before building the batch")
