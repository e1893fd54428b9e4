"""The prompt/answer codec: exact strings, round trips, and every way an answer can be malformed."""

import re

import numpy as np
import pytest

from llarva_policy import codec
from llarva_policy.codec import (
    RELEASED_INFERENCE, TRAINING, AnswerParseError, answer_span, build_conversation_text,
    build_prompt, build_question, format_answer, format_history, get_template, parse_answer,
)

JOINTS_A = [0.1, -0.106, 0.0, -2.0, 0.00004, 1.23456, -0.00004]
JOINTS_B = [1, 2, 3, 4, 5, 6, 7]
SYSTEM_TRAINING = ("A chat between a curious user and an artificial intelligence assistant. The assistant "
                   "gives helpful, detailed, and polite answers to the user's questions.")
SYSTEM_RELEASED = ("A chat between a curious human and an artificial intelligence assistant. The assistant "
                   "gives helpful, detailed, and polite answers to the human's questions.")


# --- history ---------------------------------------------------------------------------------

def test_history_pads_at_the_front_with_integer_zeros():
    assert format_history([JOINTS_A, JOINTS_B]) == (
        "[[0, 0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0, 0], "
        "[0.1, -0.106, 0.0, -2.0, 0.0, 1.2346, -0.0], [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]]")


def test_history_keeps_the_last_five_oldest_first():
    steps = [[float(i)] * 7 for i in range(8)]
    text = format_history(np.array(steps))
    assert text == str([[float(i)] * 7 for i in range(3, 8)])


def test_history_accepts_numpy_float32_and_prints_python_floats():
    text = format_history([np.array(JOINTS_A, dtype=np.float32)] * 5)
    assert "np.float" not in text
    assert text.startswith("[[0.1, -0.106, 0.0, -2.0, 0.0, 1.2346, -0.0], ")


def test_history_noise_is_off_by_default_and_deterministic_for_a_seed():
    history = [JOINTS_A, JOINTS_B]
    assert format_history(history) == format_history(history, rng=np.random.default_rng(1))
    noisy_1 = format_history(history, noise_sigma=0.01, rng=np.random.default_rng(7))
    noisy_2 = format_history(history, noise_sigma=0.01, rng=np.random.default_rng(7))
    noisy_3 = format_history(history, noise_sigma=0.01, rng=np.random.default_rng(8))
    assert noisy_1 == noisy_2 != noisy_3
    assert noisy_1 != format_history(history)
    # Noise goes on the real steps only, before rounding; padding stays exact integer zeros.
    assert noisy_1.startswith("[[0, 0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0, 0], [")
    values = np.array(eval(noisy_1)[3:], dtype=float)
    assert np.all(np.abs(values - np.array([JOINTS_A, JOINTS_B])) < 0.06)
    assert all(re.fullmatch(r"-?\d+\.\d{1,4}", repr(v)) for v in eval(noisy_1)[4])


@pytest.mark.parametrize("history, hint", [
    ([], "empty"),
    ([[0.0] * 6], "7 finite numbers"),
    ([[0.0] * 8], "7 finite numbers"),
    ([[0.0] * 6 + [float("nan")]], "7 finite numbers"),
    ([[0.0] * 6 + [float("inf")]], "7 finite numbers"),
    ([["a"] * 7], "7 finite numbers"),
    (np.zeros(7), "flat vector"),
])
def test_history_rejects_bad_joint_positions(history, hint):
    with pytest.raises(ValueError, match="joint_positions") as error:
        format_history(history)
    assert hint in str(error.value)


# --- question and prompt -----------------------------------------------------------------------

HISTORY = format_history([JOINTS_B])
HISTORY_TEXT = ("[[0, 0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0, 0], "
                "[0, 0, 0, 0, 0, 0, 0], [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]]")


def test_question_training_wording():
    assert HISTORY == HISTORY_TEXT
    assert build_question("sweep dirt to the short dustpan", HISTORY) == (
        '<image>\nYou are a Franka robot using the joint control. The task is "sweep dirt to the short '
        'dustpan", and the previous five (including current) steps are ' + HISTORY_TEXT +
        ". Can you predict action of the next 1 step?")


def test_question_training_wording_with_visual_trace():
    assert build_question("open the drawer", HISTORY, visual_trace=True) == (
        '<image>\nYou are a Franka robot using the joint control. The task is "open the drawer", and '
        "the previous five (including current) steps are " + HISTORY_TEXT + ". Can you predict the 2D "
        "visual trace of the end effector and the action of the next 1 step?")


def test_question_released_inference_wording():
    assert build_question("open the drawer", HISTORY, template="released_inference") == (
        '<image>\nYou are a Franka robot using the joint control. The task is "open the drawer", and '
        "the previous five (including current) steps is " + HISTORY_TEXT +
        ", can you predict action of the next 1 step?")


def test_question_keeps_braces_in_the_instruction():
    assert 'The task is "put {x} in it",' in build_question("put {x} in it", HISTORY)


def test_question_rejects_empty_instruction():
    with pytest.raises(ValueError, match="instruction"):
        build_question("  ", HISTORY)


def test_prompt_and_training_text():
    question = build_question("open the drawer", HISTORY)
    answer = format_answer([0.0] * 7 + [1.0])
    assert build_prompt(question) == SYSTEM_TRAINING + " USER: " + question + " ASSISTANT:"
    assert build_prompt(question, template=RELEASED_INFERENCE) == (
        SYSTEM_RELEASED + " USER: " + question + " ASSISTANT:")
    text = build_conversation_text(question, answer)
    assert text == SYSTEM_TRAINING + " USER: " + question + " ASSISTANT: " + answer + "</s>"
    start, end = answer_span(question, answer)
    assert text[start:end] == answer + "</s>"
    assert text[:start].endswith("ASSISTANT: ")
    assert end == len(text)


def test_templates_by_name():
    assert get_template("training") is TRAINING is codec.TEMPLATES["training"]
    assert get_template("released_inference") is RELEASED_INFERENCE
    assert get_template(RELEASED_INFERENCE) is RELEASED_INFERENCE
    with pytest.raises(ValueError, match="unknown template 'vicuna'.*released_inference"):
        get_template("vicuna")


# --- answers ---------------------------------------------------------------------------------

def test_answer_exact_text():
    action = np.array([0.123456, -0.10600001, 0.0, -0.00004, 2.5, 1.0, -3.14159, 1.0], dtype=np.float64)
    assert format_answer(action) == (
        "The next action step: [0.1235, -0.106, 0.0, -0.0, 2.5, 1.0, -3.1416, 1.0]")


def test_answer_exact_text_with_trace():
    trace = np.array([[64, 70], [63.6, 71.4], [60, 75]])
    assert format_answer([0.5] * 7 + [0.0], trace) == (
        "The visual trace of the end effector: [[64, 70], [64, 71], [60, 75]]. "
        "The next action step: [0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.0]")


@pytest.mark.parametrize("action", [[0.0] * 7, [0.0] * 9, [0.0] * 7 + [float("nan")],
                                    [0.0] * 7 + [float("inf")], [1e16] * 8, "nope"])
def test_answer_rejects_bad_actions(action):
    with pytest.raises(ValueError, match="action"):
        format_answer(action)


@pytest.mark.parametrize("trace", [np.zeros((0, 2)), np.zeros((3, 3)), np.zeros(4), [[1, float("nan")]]])
def test_answer_rejects_bad_traces(trace):
    with pytest.raises(ValueError, match="trace"):
        format_answer([0.0] * 8, trace)


def test_round_trip_on_random_actions():
    rng = np.random.default_rng(0)
    actions = np.concatenate([
        rng.normal(0.0, 1.0, size=(3000, 8)),
        rng.uniform(-1e-4, 1e-4, size=(500, 8)),      # values that round to 0.0, -0.0 and +-0.0001
        rng.normal(0.0, 1.0, size=(500, 8)).round(4),  # exact 4-decimal values (ties in float)
        rng.uniform(-500, 500, size=(500, 8)).astype(np.float32),
    ])
    number = re.compile(codec.NUMBER_PATTERN)
    for action in actions:
        text = format_answer(action)
        assert text.startswith(codec.ANSWER_PREFIX) and text.endswith(codec.ANSWER_CLOSE)
        numbers = text[len(codec.ANSWER_PREFIX):-1].split(codec.NUMBER_SEPARATOR)
        assert len(numbers) == codec.ACTION_SIZE and all(number.fullmatch(n) for n in numbers)
        parsed = parse_answer(text)
        expected = np.array([round(float(v), 4) for v in action], dtype=np.float32)
        assert parsed.action.dtype == np.float32 and parsed.action.shape == (8,)
        np.testing.assert_array_equal(parsed.action, expected)
        assert parsed.trace is None and not parsed.gripper_was_missing


def test_round_trip_with_trace_and_end_of_sequence():
    rng = np.random.default_rng(1)
    for _ in range(200):
        k = int(rng.integers(1, 40))
        trace = rng.integers(0, 128, size=(k, 2))
        action = rng.normal(size=8)
        text = format_answer(action, trace) + "</s>\n"
        parsed = parse_answer(text, expect_trace=True)
        np.testing.assert_array_equal(parsed.trace, trace)
        np.testing.assert_array_equal(parsed.action, np.float32([round(float(v), 4) for v in action]))


def test_round_trip_with_released_template():
    text = format_answer([0.25] * 8, template="released_inference")
    np.testing.assert_array_equal(parse_answer(text, template=RELEASED_INFERENCE).action, [0.25] * 8)


def test_parse_tolerates_whitespace_and_end_of_sequence():
    answer = "The next action step: [0.1, -0.2, 0.3, 0.0, 0.0, 0.0, 0.0, 1.0]"
    for text in (answer + "</s>", "  " + answer + " </s>  ", answer + "\n"):
        np.testing.assert_array_equal(parse_answer(text).action,
                                      np.float32([0.1, -0.2, 0.3, 0, 0, 0, 0, 1]))


def test_parse_appends_open_gripper_when_only_seven_numbers_came_back():
    parsed = parse_answer("The next action step: [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]")
    np.testing.assert_array_equal(parsed.action, np.float32([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 1.0]))
    assert parsed.gripper_was_missing


@pytest.mark.parametrize("text, problem", [
    ("", "no 'The next action step: [...]'"),
    ("I will sweep the dirt.", "no 'The next action step: [...]'"),
    ("The next action step: 0.1, 0.2", "no 'The next action step: [...]'"),
    ("The next action step: [0.1, 0.2, 0.3, 0.4, 0.5, 0.6", "no 'The next action step: [...]'"),
    ("The next action step: []", "is not a number"),
    ("The next action step: [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]", "6 numbers, not 8"),
    ("The next action step: [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 1.0, 0.0]", "9 numbers, not 8"),
    ("The next action step: [0.1, 0.2, 0.3, abc, 0.5, 0.6, 0.7, 1.0]", "'abc' is not a number"),
    ("The next action step: [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 1.0.0]", "'1.0.0' is not a number"),
    ("The next action step: [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7 1.0]", "'0.7 1.0' is not a number"),
    ("The next action step: [0.1, 0.2, 0.3, , 0.5, 0.6, 0.7, 1.0]", "'' is not a number"),
    ("The next action step: [0.1, 0.2, 0.3, nan, 0.5, 0.6, 0.7, 1.0]", "non-finite number 'nan'"),
    ("The next action step: [0.1, 0.2, 0.3, -inf, 0.5, 0.6, 0.7, 1.0]", "non-finite number '-inf'"),
    ("The next action step: [0.1, 0.2, 0.3, 1e999, 0.5, 0.6, 0.7, 1.0]", "non-finite number '1e999'"),
    ("The next action step: [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 1.0] The next action step: [",
     "unexpected text after the action"),
    ("The next action step: [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 1.0], 0.0]", "unexpected text after"),
    ("Sure! The next action step: [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 1.0]", "unexpected text before"),
    ("The visual trace of the end effector: [[1, 2]]. The next action step: [0, 0, 0, 0, 0, 0, 0, 1]",
     "expect_trace=True"),
])
def test_parse_rejects_malformed_answers_with_a_helpful_message(text, problem):
    with pytest.raises(AnswerParseError) as error:
        parse_answer(text)
    message = str(error.value)
    assert problem in message
    assert "expected 'The next action step: [v1, v2, v3, v4, v5, v6, v7, g]'" in message
    assert repr(text[:200]) in message            # the offending text is quoted
    assert isinstance(error.value, ValueError) and error.value.text == text


@pytest.mark.parametrize("text, problem", [
    ("The next action step: [0, 0, 0, 0, 0, 0, 0, 1]", "no visual trace"),
    ("The visual trace of the end effector: []. The next action step: [0, 0, 0, 0, 0, 0, 0, 1]",
     "not a list of [x, y] pairs"),
    ("The visual trace of the end effector: [[1, 2], 3]. The next action step: [0, 0, 0, 0, 0, 0, 0, 1]",
     "not a list of [x, y] pairs"),
    ("The visual trace of the end effector: [[1, 2, 3]]. The next action step: [0, 0, 0, 0, 0, 0, 0, 1]",
     "trace point [1, 2, 3] is not two integers"),
    ("The visual trace of the end effector: [[1.5, 2]]. The next action step: [0, 0, 0, 0, 0, 0, 0, 1]",
     "trace point [1.5, 2] is not two integers"),
])
def test_parse_rejects_malformed_traces(text, problem):
    with pytest.raises(AnswerParseError, match=re.escape(problem)) as error:
        parse_answer(text, expect_trace=True)
    assert "The visual trace of the end effector: [[x1, y1], ..., [xk, yk]]. " in str(error.value)


def test_parse_error_truncates_long_text():
    text = "garbage " * 500
    with pytest.raises(AnswerParseError) as error:
        parse_answer(text)
    assert len(str(error.value)) < 500 and "..." in str(error.value)


def test_parse_rejects_non_strings():
    with pytest.raises(AnswerParseError, match="not a string"):
        parse_answer(None)


def test_every_character_of_an_answer_has_the_kind_it_writes():
    answer = codec.format_answer([0.1234, -0.05, 1.5, -0.0, 0.0001, -2.25, 0.3, 1.0], np.array([[64, 30], [70, 41]]))
    kinds = codec.answer_character_kinds(answer)
    assert len(kinds) == len(answer) and set(kinds) <= set(codec.ANSWER_KINDS)

    def written(kind):
        return "".join(c for c, k in zip(answer, kinds) if k == kind)
    assert written("trace_digit") == "64307041"
    assert written("sign") == "---"                       # -0.05, -0.0, -2.25; positives have none
    assert written("integer_digit") == "0010020" and written("decimal1") == "1050023"
    assert written("decimal2") == "2505" and written("decimal3") == "30" and written("decimal4") == "41"
    assert written("gripper") == "1.0"
    assert all(k == "other" for c, k in zip(answer[:-3], kinds) if not (c.isdigit() or c == "-"))   # the dots too
    no_trace = codec.format_answer([0.5] * 7 + [0.0])
    assert "trace_digit" not in codec.answer_character_kinds(no_trace)
    with pytest.raises(ValueError, match="answer: expected the action after"):
        codec.answer_character_kinds("[[64, 30]] and no action")
