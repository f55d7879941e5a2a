"""Tasks and reward functions: what earns a reward and what does not."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mhpo.trainer.tasks import (
    AdditionTask,
    CountdownTask,
    Example,
    make_regex_reward,
    make_task,
    reward_exact,
    reward_numeric,
)


@given(st.integers(1, 3), st.integers(0, 2**31))
def test_addition_reference_answers_earn_the_reward(digits: int, seed: int) -> None:
    task = AdditionTask(digits)
    for ex in task.sample(random.Random(seed), 8):
        a, b = ex.prompt.rstrip("=").split("+")
        assert int(ex.answer) == int(a) + int(b)
        assert task.reward(ex.answer, ex) == 1.0
        assert task.reward(str(int(ex.answer) + 1), ex) == 0.0
        assert set(ex.prompt + ex.answer) <= set(task.charset())


@given(st.integers(0, 2**31))
def test_countdown_reference_answers_earn_the_reward(seed: int) -> None:
    task = CountdownTask()
    for ex in task.sample(random.Random(seed), 8):
        assert task.reward(ex.answer, ex) == 1.0
        assert set(ex.prompt + ex.answer) <= set(task.charset())


def test_countdown_rejects_wrong_numbers_and_non_arithmetic() -> None:
    task = CountdownTask()
    ex = Example("3 5 7>22:", "3*5+7")
    assert task.reward("7+3*5", ex) == 1.0  # any valid expression counts
    assert task.reward("3*5+7+0", ex) == 0.0  # extra number
    assert task.reward("15+7", ex) == 0.0  # numbers not the given ones
    assert task.reward("__import__('os')", ex) == 0.0
    assert task.reward("3*5-7", ex) == 0.0


def test_reward_functions() -> None:
    assert reward_exact(" 42 ", "42") == 1.0
    assert reward_exact("42.0", "42") == 0.0
    assert reward_numeric("the answer is 42.0", "42") == 1.0
    assert reward_numeric("41 then 43", "42") == 0.0
    assert reward_numeric("no number", "42") == 0.0
    fmt = make_regex_reward(r"<answer>(?P<answer>.*?)</answer>")
    assert fmt("x <answer>7</answer>", "7") == 1.0
    assert fmt("<answer>8</answer>", "7") == 0.0
    assert make_regex_reward(r"^\d+$")("123", "anything") == 1.0


def test_jsonl_task(tmp_path: Path) -> None:
    data = tmp_path / "math.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"{i}*2=", "answer": 2 * i}) for i in range(5)) + "\n")
    task = make_task(None, data=str(data), reward="numeric")
    examples = task.sample(random.Random(0), 10)
    assert all(task.reward(ex.answer, ex) == 1.0 for ex in examples)
    assert set("0123456789*=") >= set(task.charset())


def test_jsonl_errors_name_the_problem(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "1+1", "answer": "2"}) + "\n")
    with pytest.raises(ValueError, match="prompt"):
        make_task(None, data=str(bad))
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"prompt": "1+1=", "answer": "2"}) + "\n")
    with pytest.raises(ValueError, match="reward_pattern"):
        make_task(None, data=str(good), reward="regex")
    with pytest.raises(ValueError, match="valid: exact"):
        make_task(None, data=str(good), reward="fuzzy")
    with pytest.raises(ValueError, match="valid: addition"):
        make_task("sudoku")
