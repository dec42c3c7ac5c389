"""Exact arithmetic for a model that cannot multiply: rationals, never floats, never `eval`.

The expression is parsed with `ast` and only numbers, + - * / // % **, parentheses and a few
named functions are accepted; anything else (names, attributes, calls to other functions) is
refused with an error saying what was found. Numbers are `Fraction`s, so 0.1 + 0.2 is 0.3 and
1/3 * 3 is 1. Exponents and results are bounded, so `9**9**9` is an error, not a hung worker.
"""
from __future__ import annotations

import ast
import math
import operator
from decimal import Decimal, localcontext
from fractions import Fraction
from typing import Annotated

from pydantic import Field

from internray.agent.tools.base import Tool, ToolContext, ToolError

_MAX_EXPONENT = 10_000
_MAX_DIGITS = 10_000
_SHOWN_DIGITS = 30

_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}


def _sqrt(x: Fraction) -> Fraction:
    if x < 0:
        raise ToolError("sqrt of a negative number")
    root_n, root_d = math.isqrt(x.numerator), math.isqrt(x.denominator)
    if root_n * root_n == x.numerator and root_d * root_d == x.denominator:
        return Fraction(root_n, root_d)
    with localcontext() as ctx:
        ctx.prec = _SHOWN_DIGITS + 10
        return Fraction((Decimal(x.numerator) / Decimal(x.denominator)).sqrt())


_FUNCTIONS = {"abs": abs, "sqrt": _sqrt, "round": lambda x, n=0: Fraction(round(x, int(n))),
              "floor": lambda x: Fraction(math.floor(x)), "ceil": lambda x: Fraction(math.ceil(x)),
              "min": min, "max": max}


def evaluate(expression: str) -> Fraction:
    """The exact value of an arithmetic expression (`2 * (3 + 4) / 5`, `sqrt(2)`, `17 % 5`)."""
    text = expression.strip().replace("^", "**").replace("×", "*").replace("÷", "/").replace(",", "")
    if not text:
        raise ToolError("the expression is empty")
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError:
        raise ToolError(f"not an arithmetic expression: {expression!r}") from None
    return _value(tree.body)


def _value(node: ast.AST) -> Fraction:
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
        return Fraction(str(node.value))  # via str: 0.1 is one tenth, not the nearest double
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _value(node.left), _value(node.right)
        if isinstance(node.op, (ast.Div, ast.FloorDiv, ast.Mod)) and right == 0:
            raise ToolError("division by zero")
        return _bounded(_BINARY[type(node.op)](left, right))
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Pow):
        return _power(_value(node.left), _value(node.right))
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_value(node.operand))
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCTIONS and not node.keywords:
        return _bounded(Fraction(_FUNCTIONS[node.func.id](*[_value(a) for a in node.args])))
    found = type(node).__name__
    if isinstance(node, ast.Name):
        found = f"the name {node.id!r}"
    elif isinstance(node, ast.Call):
        found = f"a call to {ast.unparse(node.func)!r}"
    raise ToolError(f"only numbers, + - * / // % ** and {', '.join(_FUNCTIONS)}() are allowed; found {found}")


def _power(base: Fraction, exponent: Fraction) -> Fraction:
    if exponent.denominator == 1:
        if abs(exponent) > _MAX_EXPONENT:
            raise ToolError(f"exponent {exponent} is too large (at most {_MAX_EXPONENT})")
        if base == 0 and exponent < 0:
            raise ToolError("division by zero")
        return _bounded(base ** int(exponent))
    if exponent == Fraction(1, 2):
        return _sqrt(base)
    if base < 0:
        raise ToolError("a negative number to a fractional power is not real")
    return _bounded(Fraction(float(base) ** float(exponent)))  # irrational: a float is the honest answer


def _bounded(value: Fraction) -> Fraction:
    if max(value.numerator.bit_length(), value.denominator.bit_length()) > _MAX_DIGITS * 3.33:
        raise ToolError(f"the result has more than {_MAX_DIGITS} digits")
    return value


def format_number(value: Fraction) -> str:
    """An integer as is; a fraction as a decimal, exact when it terminates, else to 30 digits
    followed by the exact fraction when it is short (1/3), or marked approximate (sqrt(2))."""
    if value.denominator == 1:
        return str(value.numerator)
    with localcontext() as ctx:
        ctx.prec = _SHOWN_DIGITS
        decimal = Decimal(value.numerator) / Decimal(value.denominator)
    exact = Fraction(decimal) == value
    text = format(decimal.normalize(), "f")
    if exact:
        return text
    if value.denominator < 10**12:
        return f"{text} (= {value.numerator}/{value.denominator})"
    return f"≈ {text}"


class Calculator(Tool):
    name = "calculator"

    def run(self, context: ToolContext, expression: Annotated[str, Field(max_length=200)]) -> str:
        """Evaluate an arithmetic expression exactly, e.g. "(17 + 5) * 3 / 4" or "sqrt(2)".

        Args:
            expression: numbers with + - * / // % ** and parentheses; functions abs, sqrt, round,
                floor, ceil, min, max
        """
        return format_number(evaluate(expression))
