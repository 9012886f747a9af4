"""Jinja2 templates in manifest strings and ``template: true`` files, rendered on the launcher.

One environment for every template: ``ImmutableSandboxedEnvironment`` (no attribute tricks
such as ``''.__class__``, no method that mutates a value), ``StrictUndefined`` (an unknown name
is an error, never an empty string), autoescape off, ``trim_blocks`` (as Ansible), Jinja
comments off (their start string contains a NUL, which no manifest string may hold, so
``${#x}`` and ``{#`` in shell keep their meaning: only ``{{ }}`` and ``{% %}`` are template
syntax). The filters are Jinja's built-in ones, none of which reads a file or the network; the
only global is ``range`` (bounded by the sandbox), and ``*`` and ``**`` are bounded so a
template cannot build a gigabyte.

A string without ``{{`` or ``{%`` is not a template and is never parsed (``is_template``): the
fast path that keeps a manifest of 10,000 hosts as fast to load as before.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping
from typing import Any

import jinja2
from jinja2.exceptions import SecurityError
from jinja2.sandbox import ImmutableSandboxedEnvironment, safe_range

#: the most characters one rendered value may have (a field or a template file)
MAX_RENDERED = 1 << 20
#: the largest operand a template may raise to a power, and the longest sequence ``*`` makes
_MAX_POWER = 64
_MAX_REPEAT = 1 << 20

#: comments cannot start: no manifest string or template file holds a NUL
_NO_COMMENT = ("\x00{#", "#}\x00")


class TemplateProblem(ValueError):
    """A template that does not parse or render; ``line`` is its line in the template."""

    def __init__(self, message: str, line: int | None = None) -> None:
        super().__init__(message)
        self.line = line


class _Environment(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset(("*", "**"))

    def call_binop(self, context: Any, operator_: str, left: Any, right: Any) -> Any:
        if operator_ == "**":
            if isinstance(right, (int, float)) and abs(right) > _MAX_POWER:
                raise SecurityError(f"exponent {right} is larger than {_MAX_POWER}")
            return operator.pow(left, right)
        for seq, times in ((left, right), (right, left)):
            if isinstance(seq, (str, list, tuple)) and isinstance(times, int):
                if len(seq) * times > _MAX_REPEAT:
                    raise SecurityError(f"the product would be longer than {_MAX_REPEAT}")
        return operator.mul(left, right)


def _environment() -> _Environment:
    env = _Environment(
        undefined=jinja2.StrictUndefined,
        autoescape=False,
        comment_start_string=_NO_COMMENT[0],
        comment_end_string=_NO_COMMENT[1],
        keep_trailing_newline=True,
        trim_blocks=True,  # as Ansible: the newline after a {% %} tag is not output
    )
    env.globals.clear()
    env.globals["range"] = safe_range
    return env


_ENV = _environment()
_COMPILED: dict[str, jinja2.Template] = {}


def is_template(text: str) -> bool:
    """Whether ``text`` holds template syntax (``{{`` or ``{%``)."""
    return "{{" in text or "{%" in text


def compile_template(source: str) -> jinja2.Template:
    """The compiled template of ``source`` (cached); TemplateProblem if it does not parse."""
    found = _COMPILED.get(source)
    if found is not None:
        return found
    try:
        template = _ENV.from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise TemplateProblem(f"template syntax error: {exc.message}", exc.lineno) from None
    if len(_COMPILED) < 10_000:
        _COMPILED[source] = template
    return template


def render(source: str, context: Mapping[str, Any]) -> str:
    """``source`` rendered with ``context``; TemplateProblem naming the first problem."""
    template = compile_template(source)
    try:
        out = template.render(context)
    except jinja2.UndefinedError as exc:
        message = (exc.message or "").replace("rexplan.core.model.FrozenDict object", "mapping")
        raise TemplateProblem(f"undefined in template: {message}", _line(exc)) from None
    except SecurityError as exc:
        raise TemplateProblem(f"refused by the template sandbox: {exc}", _line(exc)) from None
    except jinja2.TemplateError as exc:
        raise TemplateProblem(f"template error: {exc.message}", _line(exc)) from None
    except (ArithmeticError, TypeError, ValueError, LookupError, RecursionError) as exc:
        raise TemplateProblem(f"template error: {type(exc).__name__}: {exc}", _line(exc)) from None
    if len(out) > MAX_RENDERED:
        raise TemplateProblem(f"the rendered text is longer than {MAX_RENDERED} characters")
    return out


def _line(exc: BaseException) -> int | None:
    """The template line a rendering error happened on, from Jinja's rewritten traceback."""
    tb = exc.__traceback__
    line = None
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == "<template>":
            line = tb.tb_lineno
        tb = tb.tb_next
    return line
