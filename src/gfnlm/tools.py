"""Tools that write into an episode's state.

A tool watches the text of the completion so far; when the policy emits its trigger (the "="
of "6 - 4 ="), the tool returns text (" 2") that is appended to the state.  Tool output is
not an action: it counts in neither log q nor the episode length.

:class:`Calculator` is the arithmetic task's tool: a small parser of integer ``+`` and ``-``
(no ``eval``) that evaluates *every* operand.  The paper's code limited its calculator to two
operands by dropping the others, so "6 - 0 - 4" came out as -4; here an expression with more
operands than ``max_operands`` gets no answer at all (the tool stays silent) instead of a wrong one.
It also stays silent on a lone number ("4 =", "-4 ="): echoing it back lets a policy loop on
" 4 = 4 = 4 ..." without computing anything.
"""

from __future__ import annotations

import re

_TOKEN = re.compile(r"\s*(?:(\d+)|([+-]))")


def evaluate_expression(expr: str) -> tuple[int, int] | None:
    """Evaluate ``a op b op c ...`` with integers and ``+``/``-`` (a leading ``-`` negates a number).

    Returns ``(value, number_of_operands)`` or None if the text is not such an expression.
    """
    pos, tokens = 0, []
    expr = expr.rstrip()
    while pos < len(expr):
        m = _TOKEN.match(expr, pos)
        if not m or m.end() == pos:
            return None
        if m.group(1) is not None and len(m.group(1)) > 4000:  # past Python's int() digit limit: not a number here
            return None
        tokens.append(int(m.group(1)) if m.group(1) is not None else m.group(2))
        pos = m.end()
    # grammar: number (op number)*, number := [-] digits
    values, ops, i, expect_number = [], [], 0, True
    while i < len(tokens):
        tok = tokens[i]
        if expect_number:
            sign = 1
            if tok == "-":
                sign, i = -1, i + 1
                if i >= len(tokens) or not isinstance(tokens[i], int):
                    return None
                tok = tokens[i]
            if not isinstance(tok, int):
                return None
            values.append(sign * tok)
            expect_number = False
        else:
            if tok not in ("+", "-"):
                return None
            ops.append(tok)
            expect_number = True
        i += 1
    if expect_number or not values:
        return None
    total = values[0]
    for op, v in zip(ops, values[1:]):
        total = total + v if op == "+" else total - v
    return total, len(values)


class Calculator:
    """Answers "a op b =" with " <result>".

    When the completion so far ends with the trigger ``=``, the expression since the last comma
    (or since the start of the completion) is evaluated if it has at least one operator between
    two operands; a lone number ("4 =", or "-4 =": a sign is not an operator) gets no answer.

    Args:
        max_operands: the most operands the calculator will evaluate (the paper uses 2); longer
            expressions get no answer. None for no limit.
    """

    trigger = "="

    def __init__(self, max_operands: int | None = 2):
        self.max_operands = max_operands

    def __call__(self, completion: str) -> str | None:
        """Text to append after ``completion``, or None."""
        if not completion.endswith(self.trigger):
            return None
        expr = completion[: -len(self.trigger)].rsplit(",", 1)[-1]
        result = evaluate_expression(expr)
        if result is None:
            return None
        value, n = result
        if n < 2 or (self.max_operands is not None and n > self.max_operands):
            return None
        return f" {value}"
