"""The calculator tool: exact on every operand count, silent on bad or too long expressions."""

from __future__ import annotations

import itertools
import random

import pytest

from gfnlm.tools import Calculator, evaluate_expression


def reference(numbers, ops):
    total = numbers[0]
    for op, v in zip(ops, numbers[1:]):
        total = total + v if op == "+" else total - v
    return total


@pytest.mark.parametrize("n_operands", [1, 2, 3, 4, 5, 6])
def test_every_operand_counts(n_operands):
    rng = random.Random(n_operands)
    for _ in range(200):
        nums = [rng.randint(-20, 20) for _ in range(n_operands)]
        ops = [rng.choice("+-") for _ in range(n_operands - 1)]
        text = str(nums[0]) + "".join(f" {o} {v}" for o, v in zip(ops, nums[1:]))
        assert evaluate_expression(text) == (reference(nums, ops), n_operands), text


def test_the_paper_bug_case():
    # the reference code's calculator dropped an operand and answered -4
    assert evaluate_expression("6 - 0 - 4") == (2, 3)
    assert Calculator(max_operands=None)("6 - 0 - 4 =") == " 2"
    assert Calculator(max_operands=2)("6 - 0 - 4 =") is None  # too long: no answer rather than a wrong one


def test_steps_since_last_comma():
    calc = Calculator()
    assert calc("7 - 5 =") == " 2"
    assert calc("7 - 5 = 2, 2 + 8 =") == " 10"
    assert calc("7 - 5 = 2, 2 + 8 = 10, 10 - 0 =") == " 10"
    assert calc("1 - 9 = -8, -8 + 8 =") == " 0"
    assert calc("7 - 5") is None  # no trigger


@pytest.mark.parametrize("bad", ["", " ", "+", "3 +", "+ 3", "3 + + 4", "3 4", "3 * 4", "a + 1", "(1 + 2)",
                                 "1e3 + 1", "3 +4x"])
def test_bad_expressions(bad):
    assert evaluate_expression(bad) is None
    assert Calculator(max_operands=None)(bad + " =") is None


def test_whitespace_and_negative_operands():
    assert evaluate_expression("  -3+4 ") == (1, 2)
    assert evaluate_expression("12-30") == (-18, 2)
    assert evaluate_expression("3 - -4") == (7, 2)


def test_all_single_digit_pairs():
    for a, b in itertools.product(range(10), range(10)):
        assert Calculator()(f"{a} - {b} =") == f" {a - b}"
        assert Calculator()(f"{a} + {b} =") == f" {a + b}"


@pytest.mark.parametrize("max_operands", [2, None])
@pytest.mark.parametrize("text", ["4 =", " 4 =", "-4 =", "- 4 =", "12=", "7 - 5 = 2, 2 =", "1 - 9 = -8, -8 ="])
def test_a_lone_number_gets_no_answer(text, max_operands):
    # echoing a number back (" 4") let an RL run loop on "4 = 4 = 4 ..."; a leading sign is no operator
    assert Calculator(max_operands=max_operands)(text) is None
    assert evaluate_expression(text.rsplit(",", 1)[-1][:-1]) is not None  # still a number for questions


def test_a_negative_first_operand_is_still_an_expression():
    assert Calculator()("-4 - 1 =") == " -5"
    assert Calculator()("1 - 9 = -8, -8 + 8 =") == " 0"
