"""Batched generation: the fast path against transformers' generate, and constrained answers (CPU, tiny)."""

import dataclasses

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from transformers import LogitsProcessor, LogitsProcessorList  # noqa: E402

from llarva_policy import codec  # noqa: E402
from llarva_policy.generation import (  # noqa: E402
    ActionLogitsProcessor,
    FastGenerator,
    action_grammar_for,
    build_action_grammar,
    fast_path_problem,
    generate_text,
    resolve_method,
)
from llarva_policy.model import load_llava, make_random_llava  # noqa: E402

INSTRUCTIONS = ("sweep dirt to the smaller dustpan", "reach the red target", "open the top drawer")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    loaded = load_llava(make_random_llava(tmp_path_factory.mktemp("gen"), size="tiny", seed=0), device="cpu")
    loaded.tokenizer.padding_side = "left"      # as LlarvaPolicy sets it
    return loaded


def make_prompts(count, seed=0, visual_trace=False):
    """LLARVA prompts of different lengths: histories of 1 to 5 steps, several instructions."""
    rng = np.random.default_rng(seed)
    prompts = []
    for i in range(count):
        steps = [rng.uniform(-2.5, 2.5, 7) for _ in range(1 + (i * 2 + seed) % 5)]
        question = codec.build_question(INSTRUCTIONS[i % len(INSTRUCTIONS)], codec.format_history(steps),
                                        visual_trace=visual_trace and i % 2 == 0)
        prompts.append(codec.build_prompt(question))
    return prompts


def make_inputs(loaded, prompts, seed=0):
    rng = np.random.default_rng(seed)
    images = [rng.integers(0, 256, (128, 128, 3), dtype=np.uint8) for _ in prompts]
    return loaded.processor(images=images, text=prompts, padding=True, return_tensors="pt").to(loaded.device)


def hf_tokens(loaded, inputs, max_new_tokens, **kwargs):
    tokenizer = loaded.tokenizer
    output = loaded.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                   pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, **kwargs)
    return output[:, inputs["input_ids"].shape[1]:]


class RandomScores(LogitsProcessor):
    """Scores from a seeded RNG: a worst-case model, for the constrained-decoding tests."""

    def __init__(self, seed):
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, input_ids, scores):
        return torch.randn(scores.shape, generator=self.generator).to(scores.device) * 10


class BanTokens(LogitsProcessor):
    def __init__(self, token_ids):
        self.token_ids = list(token_ids)

    def __call__(self, input_ids, scores):
        scores = scores.clone()
        scores[:, self.token_ids] = float("-inf")
        return scores


# --- greedy tokens identical to transformers' generate -----------------------------------------

def test_greedy_tokens_match_generate_for_left_padded_batch(tiny):
    prompts = make_prompts(4, visual_trace=True)   # two action prompts, two visual-trace prompts
    inputs = make_inputs(tiny, prompts)
    lengths = inputs["attention_mask"].sum(dim=1)
    assert len(set(lengths.tolist())) == 4 and (inputs["attention_mask"][:, 0] == 0).any()  # really left padded
    expected = hf_tokens(tiny, inputs, 24)
    generator = FastGenerator(tiny)
    assert generator.mode == "eager"
    got = generator.generate(inputs, max_new_tokens=24)
    assert got.shape == expected.shape
    assert torch.equal(got, expected)


def test_static_cache_serves_batch_one_and_n_and_grows(tiny):
    generator = FastGenerator(tiny)
    for count, seed in ((3, 0), (1, 1), (5, 2), (1, 3)):
        inputs = make_inputs(tiny, make_prompts(count, seed=seed), seed=seed)
        expected = hf_tokens(tiny, inputs, 16)
        assert torch.equal(generator.generate(inputs, max_new_tokens=16), expected), (count, seed)
    capacity = generator.capacity
    # A much longer prompt than any so far: the cache grows and the answer is still generate's.
    long_prompt = make_prompts(1, seed=4)[0].replace("ASSISTANT:", "and more words " * 40 + "ASSISTANT:")
    inputs = make_inputs(tiny, [long_prompt, make_prompts(1)[0]])
    assert inputs["input_ids"].shape[1] + 16 > capacity
    assert torch.equal(generator.generate(inputs, max_new_tokens=16), hf_tokens(tiny, inputs, 16))
    assert generator.capacity > capacity


def test_logits_processor_and_ignore_eos(tiny):
    inputs = make_inputs(tiny, make_prompts(2))
    generator = FastGenerator(tiny)
    banned = BanTokens(range(3, 300))
    expected = hf_tokens(tiny, inputs, 12, logits_processor=LogitsProcessorList([banned]))
    assert torch.equal(generator.generate(inputs, max_new_tokens=12, logits_processor=banned), expected)
    assert not ((expected >= 3) & (expected < 300)).any()     # the processor really shaped the answer

    full = generator.generate(inputs, max_new_tokens=20, ignore_eos=True)
    assert full.shape == (2, 20) and not (full == tiny.tokenizer.eos_token_id).any()


def test_generate_text_default_is_transformers_generate(tiny):
    inputs = make_inputs(tiny, make_prompts(3))
    assert resolve_method("auto", tiny) == "hf"                       # CPU: today's behaviour
    expected = tiny.tokenizer.batch_decode(hf_tokens(tiny, inputs, 20), skip_special_tokens=True)
    assert generate_text(tiny, inputs, max_new_tokens=20) == expected
    assert generate_text(tiny, inputs, max_new_tokens=20, method="fast") == expected
    with pytest.raises(ValueError, match="method: expected one of"):
        generate_text(tiny, inputs, method="turbo")


def test_models_the_fast_path_cannot_run_fall_back_or_are_refused(tiny):
    assert fast_path_problem(tiny.model) is None
    other = dataclasses.replace(tiny, model=torch.nn.Linear(2, 2))
    assert "expected a LLaVA model" in fast_path_problem(other.model)
    assert resolve_method("auto", other) == "hf"
    with pytest.raises(ValueError, match="method='fast' cannot run this model"):
        resolve_method("fast", other)


def test_right_padding_is_refused(tiny):
    tiny.tokenizer.padding_side = "right"
    try:
        inputs = make_inputs(tiny, make_prompts(2))
    finally:
        tiny.tokenizer.padding_side = "left"
    with pytest.raises(ValueError, match="expected left padding"):
        FastGenerator(tiny).generate(inputs, max_new_tokens=4)


# --- constrained decoding -----------------------------------------------------------------------

def test_grammar_forces_in_context_tokens_and_accepts_training_answers(tiny):
    tokenizer = tiny.tokenizer
    grammar = action_grammar_for(tiny)
    assert tokenizer.decode(grammar.forced_ids).strip() == "The next action step:"   # "[" may merge with "-"
    question = codec.build_question(INSTRUCTIONS[0], codec.format_history([[0.1] * 7, [-0.2] * 7]))
    prompt_ids = tokenizer.encode(codec.build_prompt(question))
    for action in ([-0.1234, 0.5, 1.0, -2.0, 0.0, 0.0001, -0.0, 1.0], [0.0123, -0.0456, 0, 1, -2.3, 0.5, -1e-4, 0]):
        # The answer tokenized as fine-tuning tokenizes it: within the whole conversation.
        ids = tokenizer.encode(codec.build_conversation_text(question, codec.format_answer(action)))
        assert ids[:len(prompt_ids)] == prompt_ids
        answer_ids = ids[len(prompt_ids):]
        assert answer_ids[:len(grammar.forced_ids)] == grammar.forced_ids
        state = torch.tensor([0])
        for token_id in answer_ids:        # every token allowed, ending in the finished state after </s>
            assert grammar.next_state[state, token_id] >= 0, tokenizer.convert_ids_to_tokens(token_id)
            state = grammar.advance(state, torch.tensor([token_id]))
        assert int(state) == grammar.finished_state


@pytest.mark.parametrize("method", ["fast", "hf"])
def test_constrained_answers_always_parse_even_from_random_scores(tiny, method):
    grammar = action_grammar_for(tiny)
    inputs = make_inputs(tiny, make_prompts(6, seed=5), seed=5)
    answers = []
    for seed, max_new_tokens in ((0, grammar.min_new_tokens), (1, 64), (2, 128)):
        texts = generate_text(tiny, inputs, max_new_tokens=max_new_tokens, method=method, constrained=True,
                              logits_processor=LogitsProcessorList([RandomScores(seed)]))
        for text in texts:
            assert text.startswith(codec.ANSWER_PREFIX)
            assert len(tiny.tokenizer.encode(text, add_special_tokens=False)) <= max_new_tokens + 1
            answers.append(codec.parse_answer(text).action)     # raises if it does not parse
    values = np.concatenate(answers)
    assert (values < 0).any() and (values > 0).any() and len(np.unique(values)) > 20   # really varied


def test_constrained_greedy_parses_and_matches_between_engines(tmp_path):
    for seed in (1, 2):
        loaded = load_llava(make_random_llava(tmp_path / str(seed), size="tiny", seed=seed), device="cpu")
        loaded.tokenizer.padding_side = "left"
        inputs = make_inputs(loaded, make_prompts(5, seed=seed), seed=seed)
        fast = generate_text(loaded, inputs, max_new_tokens=64, method="fast", constrained=True)
        hf = generate_text(loaded, inputs, max_new_tokens=64, method="hf", constrained=True)
        assert fast == hf
        for text in fast:
            assert codec.parse_answer(text).action.shape == (codec.ACTION_SIZE,)


def test_constrained_needs_room_for_an_answer(tiny):
    grammar = action_grammar_for(tiny)
    inputs = make_inputs(tiny, make_prompts(1))
    for method in ("fast", "hf"):
        with pytest.raises(ValueError, match=f"needs at least {grammar.min_new_tokens} tokens"):
            generate_text(tiny, inputs, max_new_tokens=grammar.min_new_tokens - 1, method=method, constrained=True)
    with pytest.raises(ValueError, match="too small"):
        ActionLogitsProcessor(grammar, 10, 5)


def test_grammar_for_another_template(tiny):
    template = codec.Template(name="custom", system="S.", question="{instruction} {history}?",
                              question_with_trace="{instruction} {history}??", action_prefix="Action: ")
    grammar = build_action_grammar(tiny.tokenizer, tiny.model.config.text_config.vocab_size, template=template)
    inputs = make_inputs(tiny, [codec.build_prompt("<image>\nreach 1 2?", template=template)])
    text = generate_text(tiny, inputs, max_new_tokens=grammar.min_new_tokens + 10, method="fast", constrained=True,
                         template=template)[0]
    assert text.startswith("Action: [")
    assert codec.parse_answer(text, template=template).action.shape == (8,)


# --- CUDA graphs ----------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU; none is available here")
def test_cuda_graph_decoding_matches_eager_and_generate(tmp_path):
    loaded = load_llava(make_random_llava(tmp_path, size="tiny", seed=0), device="cuda", dtype="fp32")
    loaded.tokenizer.padding_side = "left"
    graphed = FastGenerator(loaded)
    eager = FastGenerator(loaded, use_cuda_graphs=False)
    for count in (1, 4, 1):
        inputs = make_inputs(loaded, make_prompts(count, seed=count), seed=count)
        got = graphed.generate(inputs, max_new_tokens=24)
        assert graphed.mode == "cuda-graph", graphed.fallback_reason
        assert torch.equal(got, eager.generate(inputs, max_new_tokens=24))
        assert torch.equal(got, hf_tokens(loaded, inputs, 24))
        texts = generate_text(loaded, inputs, max_new_tokens=64, constrained=True)   # auto: fast on CUDA
        assert all(codec.parse_answer(text) for text in texts)
    assert resolve_method("auto", loaded) == "fast"
