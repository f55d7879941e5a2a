"""Prompts with verifiable rewards: built-in synthetic tasks and JSONL data.

A task samples `Example`s from a `random.Random` (so its state is part of a checkpoint) and
scores a decoded completion against the example's answer with a reward function in [0, 1].

Built-in tasks:
- `addition`: "a+b=" -> digits of the sum (`digits` per operand, default 2); exact reward.
- `countdown`: "n1 n2 n3>target:" -> an arithmetic expression over the numbers, each used
  once, that evaluates to the target; the reference answer is the expression the target
  was built from, but any valid expression earns the reward.
- `jsonl`: `--data FILE.jsonl`, one object per line with `prompt` and `answer` (strings);
  the reward function is chosen with `--reward exact|numeric|regex`.
"""

from __future__ import annotations

import ast
import json
import math
import operator
import random
import re
import string
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

REWARDS = ("exact", "numeric", "regex")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")


@dataclass(frozen=True)
class Example:
    prompt: str
    answer: str


class Task(Protocol):
    name: str

    def sample(self, rng: random.Random, n: int) -> list[Example]:
        """`n` examples drawn with `rng`."""
        ...

    def reward(self, completion: str, example: Example) -> float:
        """Score in [0, 1] of a decoded completion (special tokens stripped)."""
        ...

    def charset(self) -> str:
        """Every character prompts and answers may contain (for the character tokenizer)."""
        ...


def reward_exact(completion: str, answer: str) -> float:
    return float(completion.strip() == answer.strip())


def reward_numeric(completion: str, answer: str) -> float:
    """1 when the last number in the completion equals the answer's number (rel. tol 1e-6)."""
    got = _NUMBER.findall(completion)
    want = _NUMBER.findall(answer)
    if not got or not want:
        return 0.0
    a, b = float(got[-1]), float(want[-1])
    return float(math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9))


def make_regex_reward(pattern: str) -> Callable[[str, str], float]:
    """Format reward: 1 when `pattern` matches; with a named group `answer`, that group must
    also equal the answer exactly."""
    compiled = re.compile(pattern, re.DOTALL)

    def reward(completion: str, answer: str) -> float:
        match = compiled.search(completion)
        if match is None:
            return 0.0
        if "answer" in compiled.groupindex:
            return float((match.group("answer") or "").strip() == answer.strip())
        return 1.0

    return reward


class AdditionTask:
    """Multi-digit addition: the answer is the decimal sum."""

    name = "addition"

    def __init__(self, digits: int = 2) -> None:
        if digits < 1:
            raise ValueError(f"task digits={digits} must be >= 1; use e.g. --task-digits 2")
        self.digits = digits

    def sample(self, rng: random.Random, n: int) -> list[Example]:
        hi = 10**self.digits - 1
        out = []
        for _ in range(n):
            a, b = rng.randint(0, hi), rng.randint(0, hi)
            out.append(Example(f"{a}+{b}=", str(a + b)))
        return out

    def reward(self, completion: str, example: Example) -> float:
        return reward_exact(completion, example.answer)

    def charset(self) -> str:
        return string.digits + "+="


_OPS: dict[type, Callable[[int, int], int]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
}


def _evaluate(node: ast.AST) -> int:
    if isinstance(node, ast.Expression):
        return _evaluate(node.body)
    if isinstance(node, ast.Constant) and isinstance(node.value, int):
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        return _OPS[type(node.op)](_evaluate(node.left), _evaluate(node.right))
    raise ValueError("unsupported expression")


class CountdownTask:
    """Countdown-style: combine the given numbers with + - * (each exactly once) to hit the target."""

    name = "countdown"

    def __init__(self, numbers: int = 3, max_number: int = 9) -> None:
        if numbers < 2:
            raise ValueError(f"countdown numbers={numbers} must be >= 2")
        self.numbers = numbers
        self.max_number = max_number

    def sample(self, rng: random.Random, n: int) -> list[Example]:
        out = []
        for _ in range(n):
            nums = [rng.randint(1, self.max_number) for _ in range(self.numbers)]
            expr = str(nums[0])
            for value in nums[1:]:
                expr += rng.choice("+-*") + str(value)
            target = _evaluate(ast.parse(expr, mode="eval"))
            out.append(Example(f"{' '.join(map(str, nums))}>{target}:", expr))
        return out

    def reward(self, completion: str, example: Example) -> float:
        text = completion.strip()
        if not text or not re.fullmatch(r"[\d+\-*() ]+", text):
            return 0.0
        nums_part, target = example.prompt.rstrip(":").split(">")
        if sorted(re.findall(r"\d+", text)) != sorted(nums_part.split()):
            return 0.0
        try:
            value = _evaluate(ast.parse(text, mode="eval"))
        except (SyntaxError, ValueError):
            return 0.0
        return float(value == int(target))

    def charset(self) -> str:
        return string.digits + "+-*()> :"


class JsonlTask:
    """Examples from a JSONL file with `prompt` and `answer` string fields, sampled uniformly."""

    name = "jsonl"

    def __init__(self, path: str | Path, reward: str = "exact", reward_pattern: str | None = None) -> None:
        self.path = Path(path)
        self.examples: list[Example] = []
        for lineno, line in enumerate(self.path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if not isinstance(row.get("prompt"), str) or "answer" not in row:
                raise ValueError(
                    f"{self.path}:{lineno}: each line needs a string 'prompt' and an 'answer'; got keys {sorted(row)}"
                )
            self.examples.append(Example(row["prompt"], str(row["answer"])))
        if not self.examples:
            raise ValueError(f"data file {self.path} has no examples; write one JSON object per line")
        if reward == "exact":
            self._reward: Callable[[str, str], float] = reward_exact
        elif reward == "numeric":
            self._reward = reward_numeric
        elif reward == "regex":
            if not reward_pattern:
                raise ValueError("reward='regex' needs reward_pattern (--reward-pattern REGEX)")
            self._reward = make_regex_reward(reward_pattern)
        else:
            raise ValueError(f"reward={reward!r} is unknown; valid: {', '.join(REWARDS)}")

    def sample(self, rng: random.Random, n: int) -> list[Example]:
        return [self.examples[rng.randrange(len(self.examples))] for _ in range(n)]

    def reward(self, completion: str, example: Example) -> float:
        return self._reward(completion, example.answer)

    def charset(self) -> str:
        return "".join(sorted({ch for ex in self.examples for ch in ex.prompt + ex.answer}))


TASKS = ("addition", "countdown")


def make_task(
    name: str | None,
    data: str | None = None,
    reward: str = "exact",
    reward_pattern: str | None = None,
    digits: int = 2,
) -> Task:
    """The task named by `--task`, or the JSONL task when `--data` is given."""
    if data:
        return JsonlTask(data, reward=reward, reward_pattern=reward_pattern)
    if name == "addition":
        return AdditionTask(digits=digits)
    if name == "countdown":
        return CountdownTask()
    raise ValueError(f"task={name!r} is unknown; valid: {', '.join(TASKS)} (or --data FILE.jsonl)")
