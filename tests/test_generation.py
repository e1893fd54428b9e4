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


# --- constrained decoding with a visual trace ------------------------------------------------------

TRACE_ACTION = [-0.1234, 0.5, 1.0, -2.0, 0.0, 0.0001, -0.0, 1.0]


def trace_question(seed=0):
    rng = np.random.default_rng(seed)
    return codec.build_question(INSTRUCTIONS[seed % 3], codec.format_history([rng.uniform(-1, 1, 7)]),
                                visual_trace=True)


def walk(tokenizer, grammar, question, answer_text):
    """`answer_text`'s tokens, as fine-tuning tokenizes them within the conversation, through the
    grammar: (final state, None) if every token is allowed, else (None, the text before the first
    token that is not, that token's text)."""
    prompt_ids = tokenizer.encode(codec.build_prompt(question))
    ids = tokenizer.encode(codec.build_conversation_text(question, answer_text))
    assert ids[:len(prompt_ids)] == prompt_ids
    answer_ids = ids[len(prompt_ids):]
    state = 0
    for i, token_id in enumerate(answer_ids):
        target = int(grammar.next_state[state, token_id])
        if target < 0:
            return None, (tokenizer.decode(answer_ids[:i]), tokenizer.decode(answer_ids[:i + 1]))
        state = target
    return state, None


def test_trace_grammar_accepts_what_format_answer_writes(tiny):
    tokenizer = tiny.tokenizer
    grammar = action_grammar_for(tiny, visual_trace=True)
    assert tokenizer.decode(grammar.forced_ids).startswith("The visual trace of the end effector:")
    rng = np.random.default_rng(0)
    traces = ([[0, 0]], [[64, 12], [0, 127], [1023, 5], [9999, 10], [7, 100]],
              rng.integers(0, 640, (30, 2)), rng.integers(0, 10000, (64, 2)))
    for seed, trace in enumerate(traces):
        text = codec.format_answer(TRACE_ACTION, np.array(trace))
        state, rejected = walk(tokenizer, grammar, trace_question(seed), text)
        assert rejected is None and state == grammar.finished_state, (text, rejected)
        np.testing.assert_array_equal(codec.parse_answer(text, expect_trace=True).trace, trace)
    # An action answer alone is not a trace answer, and the action grammar takes no trace.
    assert walk(tokenizer, grammar, trace_question(), codec.format_answer(TRACE_ACTION))[0] is None
    text = codec.format_answer(TRACE_ACTION, np.array([[1, 2]]))
    assert walk(tokenizer, action_grammar_for(tiny), trace_question(), text)[0] is None


@pytest.mark.parametrize("trace_text, valid_part", [
    ("[[-5, 3]]", "[["),                                  # a negative coordinate
    ("[[64 12]]", "[[64"),                                # a missing comma
    ("[[64, 12] [1, 2]]", "[[64, 12]"),                   # a missing comma between points
    ("[[64, 12], [1, 12345]]", "[[64, 12], [1, 1234"),    # five digits
    ("[[64, 07]]", "[[64, 0"),                            # a leading zero
    ("[[64, 12], [1, 2], [3, 4]]", "[[64, 12], [1, 2]"),  # three points, two at most
    ("[[]]", "[["),                                       # no point
])
def test_trace_grammar_rejects_a_malformed_trace_at_the_right_token(tiny, trace_text, valid_part):
    grammar = build_action_grammar(tiny.tokenizer, tiny.model.config.text_config.vocab_size, visual_trace=True,
                                   max_trace_points=2)
    prefix = codec.TRAINING.trace_prefix
    text = prefix + trace_text + codec.TRAINING.trace_suffix + codec.format_answer(TRACE_ACTION)
    state, (before, through) = walk(tiny.tokenizer, grammar, trace_question(), text)
    assert state is None
    # The refused token is the one that holds the first bad character (it may merge with the
    # good characters before it, as "▁[[-" does): everything before it was allowed.
    bad = len(prefix + valid_part)
    assert text.startswith(through) and len(before) <= bad < len(through), (before, through)


def test_trace_grammar_size_grows_linearly_with_the_points(tiny):
    vocab_size = tiny.model.config.text_config.vocab_size

    def states(points):
        return build_action_grammar(tiny.tokenizer, vocab_size, visual_trace=True,
                                    max_trace_points=points).next_state.shape[0]

    per_point = states(33) - states(32)
    assert per_point <= 14 and states(64) - states(32) == 32 * per_point
    with pytest.raises(ValueError, match="max_trace_points: expected an int >= 1"):
        build_action_grammar(tiny.tokenizer, vocab_size, visual_trace=True, max_trace_points=0)


@pytest.mark.parametrize("method", ["fast", "hf"])
def test_constrained_trace_answers_always_parse_even_from_random_scores(tiny, method):
    grammar = action_grammar_for(tiny, visual_trace=True)
    prompts = [codec.build_prompt(trace_question(seed)) for seed in range(4)]
    inputs = make_inputs(tiny, prompts, seed=7)
    points, coordinates, actions = [], [], []
    for seed, max_new_tokens in ((0, grammar.min_new_tokens), (1, 120), (2, 400)):
        texts = generate_text(tiny, inputs, max_new_tokens=max_new_tokens, method=method, constrained=True,
                              visual_trace=True, logits_processor=LogitsProcessorList([RandomScores(seed)]))
        for text in texts:
            assert text.startswith(codec.TRAINING.trace_prefix + "[[")
            assert len(tiny.tokenizer.encode(text, add_special_tokens=False)) <= max_new_tokens + 1
            parsed = codec.parse_answer(text, expect_trace=True)      # raises if it does not parse
            assert 1 <= len(parsed.trace) <= 64 and (parsed.trace >= 0).all() and (parsed.trace < 10000).all()
            if max_new_tokens == grammar.min_new_tokens:             # no room for more than one point
                assert len(parsed.trace) == 1
            points.append(len(parsed.trace))
            coordinates.append(parsed.trace.ravel())
            actions.append(parsed.action)
    coordinates = np.concatenate(coordinates)
    assert max(points) > 1 and len(np.unique(coordinates)) > 20 and (coordinates >= 1000).any()   # really varied
    assert len(np.unique(np.concatenate(actions))) > 10


class PreferTokens(LogitsProcessor):
    """Adds a large bonus to some tokens: a model that always wants to go on."""

    def __init__(self, token_ids):
        self.token_ids = list(token_ids)

    def __call__(self, input_ids, scores):
        scores = scores.clone()
        scores[:, self.token_ids] += 100.0
        return scores


def test_long_traces_stop_at_max_points_and_close_within_the_budget(tiny):
    tokenizer = tiny.tokenizer
    commas = [i for i in range(len(tokenizer)) if "," in tokenizer.decode([i])]   # "another point", when allowed
    inputs = make_inputs(tiny, [codec.build_prompt(trace_question(seed)) for seed in range(3)], seed=2)
    grammar = build_action_grammar(tokenizer, tiny.model.config.text_config.vocab_size, visual_trace=True,
                                   max_trace_points=3)
    constrain = ActionLogitsProcessor(grammar, inputs["input_ids"].shape[1], 200)
    new_tokens = hf_tokens(tiny, inputs, 200, logits_processor=LogitsProcessorList(
        [RandomScores(0), PreferTokens(commas), constrain]))
    for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True):
        assert len(codec.parse_answer(text, expect_trace=True).trace) == 3, text
    # The default grammar (64 points): the budget, not the bound, ends the trace, and in time.
    for method in ("fast", "hf"):
        texts = generate_text(tiny, inputs, max_new_tokens=150, method=method, constrained=True, visual_trace=True,
                              logits_processor=LogitsProcessorList([RandomScores(1), PreferTokens(commas)]))
        for text in texts:
            assert len(tokenizer.encode(text, add_special_tokens=False)) <= 151
            assert 3 < len(codec.parse_answer(text, expect_trace=True).trace) < 64, text


def test_constrained_trace_greedy_matches_between_engines_and_grammars_are_cached(tiny):
    inputs = make_inputs(tiny, [codec.build_prompt(trace_question(seed)) for seed in range(3)], seed=3)
    fast = generate_text(tiny, inputs, max_new_tokens=100, method="fast", constrained=True, visual_trace=True)
    hf = generate_text(tiny, inputs, max_new_tokens=100, method="hf", constrained=True, visual_trace=True)
    assert fast == hf
    for text in fast:
        assert codec.parse_answer(text, expect_trace=True).trace.shape[1] == 2
    traced = action_grammar_for(tiny, visual_trace=True)
    assert action_grammar_for(tiny, visual_trace=True) is traced and action_grammar_for(tiny) is not traced
    assert traced.min_new_tokens > action_grammar_for(tiny).min_new_tokens


def test_constrained_trace_needs_room_for_the_shortest_answer(tiny):
    grammar = action_grammar_for(tiny, visual_trace=True)
    inputs = make_inputs(tiny, [codec.build_prompt(trace_question())])
    for method in ("fast", "hf"):
        with pytest.raises(ValueError, match=f"max_new_tokens={grammar.min_new_tokens - 1} is too small.*"
                                             f"needs at least {grammar.min_new_tokens} tokens"):
            generate_text(tiny, inputs, max_new_tokens=grammar.min_new_tokens - 1, method=method, constrained=True,
                          visual_trace=True)
    # The shortest answer is one point, "[[0, 0]]": exactly that many tokens with the EOS.
    shortest = codec.format_answer([0.0] * 8, np.array([[0, 0]]))
    question = trace_question()
    ids = tiny.tokenizer.encode(codec.build_conversation_text(question, shortest))
    answer_tokens = len(ids) - len(tiny.tokenizer.encode(codec.build_prompt(question)))
    assert grammar.min_new_tokens <= answer_tokens


# --- multi-token decoding: forced runs in the forward of the token before them -----------------------

def test_grammar_forces_separators_and_leaves_out_byte_fallback_spellings(tiny):
    tokenizer = tiny.tokenizer
    grammar = action_grammar_for(tiny)
    comma, close = tokenizer.convert_tokens_to_ids([",", "]"])
    # The answer as fine-tuning tokenizes it; the grammar's state after each token, by the text so far.
    question = trace_question()
    prompt_ids = tokenizer.encode(codec.build_prompt(question))
    text = codec.format_answer([0.1234, -0.5, 0, 0, 0, 0, 0, 0.5678])
    ids = tokenizer.encode(codec.build_conversation_text(question, text))[len(prompt_ids):]
    state_after = {}
    state = 0
    for i, token_id in enumerate(ids):
        state = int(grammar.next_state[state, token_id])
        state_after[tokenizer.decode(ids[:i + 1]).strip()] = state
    after_decimals = state_after[codec.ANSWER_PREFIX + "0.1234"]
    assert grammar.forced_token[after_decimals] == comma          # after a fourth decimal: "," and nothing else
    assert grammar.next_state[after_decimals, tokenizer.convert_tokens_to_ids("<0x2C>")] < 0   # not its byte spelling
    assert grammar.forced_next[after_decimals] == grammar.next_state[after_decimals, comma]
    # The last number's fourth decimal: "]" then EOS, a forced run that ends the answer.
    before_close = state_after[text[:-1]]
    assert grammar.forced_token[before_close] == close
    before_eos = grammar.forced_next[before_close]
    assert grammar.forced_token[before_eos] == tokenizer.eos_token_id
    assert grammar.forced_next[before_eos] == grammar.finished_state
    assert grammar.forced_token[grammar.finished_state] == -1
    assert grammar.forced_token[grammar.after_forced] == -1     # a choice: "[" or "[-"


def answer_states(grammar, new_tokens):
    """The grammar state before each generated token of one row (after the fixed words)."""
    states, state = [], grammar.after_forced
    for token_id in new_tokens[len(grammar.forced_ids):].tolist():
        if state == grammar.finished_state:      # padding after the row's EOS
            break
        states.append(state)
        state = int(grammar.next_state[state, token_id])
    return states


def chunks_of(grammar, states, width):
    """How many forwards a row's answer takes `width` tokens at a time: a chunk starts at a token
    and takes in the forced tokens after it, at most `width` in all."""
    chunks, size = 0, width
    for state in states:
        if size == width or grammar.forced_token[state] < 0:
            chunks, size = chunks + 1, 0
        size += 1
    return chunks


@pytest.mark.parametrize("visual_trace", [False, True], ids=["action", "trace"])
def test_multi_token_gives_the_same_tokens_in_fewer_forwards(tiny, visual_trace):
    grammar = action_grammar_for(tiny, visual_trace=visual_trace)
    generator = FastGenerator(tiny)
    narrow = FastGenerator(tiny, multi_token_width=2)     # runs longer than 1 forced token take two forwards
    for seed in range(3):
        count = 1 + seed                                  # batch 1, then batches of left-padded rows
        questions = [trace_question(seed + i) for i in range(count)] if visual_trace else make_prompts(count, seed=seed)
        prompts = [codec.build_prompt(q) for q in questions] if visual_trace else questions
        inputs = make_inputs(tiny, prompts, seed=seed)
        for max_new_tokens in (grammar.min_new_tokens, 100):
            options = dict(max_new_tokens=max_new_tokens, constrained=True, visual_trace=visual_trace)
            one = generator.generate(inputs, multi_token=False, **options)
            one_steps = generator.last_decode_steps
            multi = generator.generate(inputs, multi_token=True, **options)
            multi_steps = generator.last_decode_steps
            auto = generator.generate(inputs, **options)                  # auto: at batch 1 only
            assert torch.equal(auto, one)
            assert generator.last_decode_steps == (multi_steps if count == 1 else one_steps)
            assert torch.equal(multi, one), (seed, max_new_tokens)
            assert torch.equal(narrow.generate(inputs, multi_token=True, **options), one), (seed, max_new_tokens)
            # One forward per token but the last; with forced runs, one per chunk but the last (the
            # batch waits for its slowest row).
            rows = [answer_states(grammar, row) for row in one]
            assert one_steps == max(map(len, rows)) - 1
            assert multi_steps == max(chunks_of(grammar, states, 3) for states in rows) - 1 < one_steps
            assert narrow.last_decode_steps == max(chunks_of(grammar, states, 2) for states in rows) - 1
        texts = tiny.tokenizer.batch_decode(multi, skip_special_tokens=True)
        assert all(codec.parse_answer(text, expect_trace=visual_trace) for text in texts)
        hf = generate_text(tiny, inputs, max_new_tokens=100, method="hf", constrained=True, visual_trace=visual_trace)
        assert texts == hf
    if visual_trace:   # a forced run longer than one token: the narrow step split it
        assert narrow.last_decode_steps > multi_steps


def test_multi_token_leaves_unconstrained_decoding_alone(tiny):
    generator = FastGenerator(tiny)
    inputs = make_inputs(tiny, make_prompts(3, seed=6), seed=6)
    plain = generator.generate(inputs, max_new_tokens=20)                                      # unconstrained
    assert generator.last_decode_steps == plain.shape[1] - 1 and not generator._wide_steps
    for bad in (dict(constrained=False), dict(constrained=True, ignore_eos=True),
                dict(constrained=True, logits_processor=RandomScores(0))):
        with pytest.raises(ValueError, match="multi_token=True: needs constrained=True"):
            generator.generate(inputs, max_new_tokens=64, multi_token=True, **bad)
    with pytest.raises(ValueError, match="multi_token: expected True, False or None"):
        generator.generate(inputs, max_new_tokens=64, constrained=True, multi_token="yes")
    with pytest.raises(ValueError, match="multi_token_width: expected an int >= 2"):
        FastGenerator(tiny, multi_token_width=1)


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
    # Constrained: the captured wide step gives the one-token step's tokens in fewer forwards.
    for visual_trace in (False, True):
        inputs = make_inputs(loaded, [codec.build_prompt(trace_question(i)) for i in range(3)] if visual_trace
                             else make_prompts(3))
        options = dict(max_new_tokens=100, constrained=True, visual_trace=visual_trace)
        one = graphed.generate(inputs, multi_token=False, **options)
        one_steps = graphed.last_decode_steps
        assert torch.equal(graphed.generate(inputs, multi_token=True, **options), one)
        assert graphed._wide_steps[3].graph is not None, graphed.fallback_reason
        assert graphed.last_decode_steps < one_steps
        assert torch.equal(eager.generate(inputs, multi_token=True, **options), one)
