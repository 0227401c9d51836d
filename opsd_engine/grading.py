"""Grading of math answers and the evaluation metrics of the paper (Section 4, Tables 2/3/5).

This module owns everything between a model's raw output and a benchmark number:

* **Answer extraction** (:func:`extract_answer`): the last ``\\boxed{...}`` / ``\\fbox{...}``
  (nested braces, the ``\\boxed 5`` space form), optionally ignoring ``<think>...</think>``
  content, with configurable phrase fallbacks ("The final answer is X", ...) when there is no
  box. The result is an :class:`Extraction` that says which rule matched.
* **Equivalence** with a reference answer (:func:`grade`, :func:`is_correct`): a normalized string
  comparison (:func:`normalize_answer`) first, because equal normalized strings are equal
  answers; then, when both sides are plain numbers (:func:`exact_number`: integers, decimals,
  separators, percentages, scientific notation, integer powers, fractions of these), an exact
  rational comparison; then ``math_verify`` (``verify(gold, prediction)``, gold first: it is not
  symmetric) for everything symbolic, with its numeric comparisons made exact (math_verify
  rounds floats to 6 decimals and chops differences below 1e-15; a verdict must never rest on
  rounding the user did not ask for). If ``math_verify`` runs past its time limit or its
  worker dies, the string comparison decides (``decided_by="timeout->string_match"`` /
  ``"error->string_match"``).
* **Metrics**: the unbiased ``pass@k`` estimator (:func:`pass_at_k`), average@k
  (:func:`avg_at_k`, the paper's "average@16"), majority vote (:func:`majority_vote`) and a
  per-benchmark :class:`BenchmarkSummary` (:func:`summarize`).

How the time limit works (and why not a thread)
-----------------------------------------------
``math_verify``'s own timeout uses ``signal.alarm``, which only works in the main thread, so it is
switched off (``parsing_timeout=None``, ``timeout_seconds=None``) and this module enforces its
own. A worker *thread* with a bounded wait is not enough: sympy evaluates some inputs (e.g.
``9^{9^{9^{9}}}``) inside one long C call that holds the GIL, so the waiting thread never gets to
give up, and the runaway computation can also eat all the memory of the process. Instead,
``math_verify`` runs in small persistent helper **subprocesses** (:class:`VerifierPool`): the
caller sends a request over a pipe and waits on it with a deadline; on timeout the helper is
SIGKILLed and replaced on the next call. This works from any thread (Celery worker threads,
asyncio's default executor, ``ThreadPoolExecutor``), from daemonic processes (it uses
``subprocess``, not ``multiprocessing``) and after ``fork`` (a forked child starts its own
helpers). Helpers are started lazily (about 0.6 s, not counted in ``timeout``), at most
``max_workers`` run at once (further callers wait for a free one; that wait is not counted in
``timeout`` either), each has an address-space limit, and they exit when the parent closes
their stdin (``atexit``) or dies. The parent process never imports ``math_verify`` or sympy.
POSIX only.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import math
import os
import pickle
import re
import selectors
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from decimal import Decimal, InvalidOperation
from fractions import Fraction
from pathlib import Path
from typing import Any, TypeVar

__all__ = [
    "DECIDED_BY",
    "DEFAULT_FALLBACK_PATTERNS",
    "BenchmarkSummary",
    "Extraction",
    "FallbackPattern",
    "GradingTimeout",
    "ProblemSummary",
    "Verdict",
    "VerifierError",
    "VerifierPool",
    "VerifierUnavailable",
    "avg_at_k",
    "call_with_timeout",
    "exact_number",
    "extract_answer",
    "grade",
    "is_correct",
    "majority_vote",
    "normalize_answer",
    "pass_at_k",
    "summarize",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: Every value :attr:`Verdict.decided_by` can take.
DECIDED_BY: tuple[str, ...] = (
    "no_answer",  # nothing could be extracted from the model output -> incorrect
    "string_match",  # normalized strings equal, or math_verify could not parse a side
    "exact_number",  # both sides are plain numbers, compared exactly as rationals
    "math_verify",  # math_verify parsed both sides and decided (numbers compared exactly)
    "timeout->string_match",  # math_verify ran past the limit; the string comparison decided
    "error->string_match",  # math_verify's helper process died; the string comparison decided
)


# --------------------------------------------------------------------------------------------
# Answer extraction
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Extraction:
    """The answer found in a model output and the rule that found it.

    ``rule`` is ``"boxed"``, ``"fbox"``, ``"fallback:<pattern name>"``, ``"none"`` (nothing found)
    or ``"unclosed_think"`` (``strip_thinking`` and the output opens ``<think>`` without closing
    it, e.g. truncated mid-reasoning: no final answer). ``answer`` is ``None`` exactly for the last
    two.
    """

    answer: str | None
    rule: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class FallbackPattern:
    """A phrase that introduces an answer when there is no box, e.g. ``"The answer is"``.

    ``lead_in`` is a regular expression (matched case-insensitively) for the text *before* the
    answer; the answer is what follows it: a ``$...$`` / ``\\(...\\)`` group if one starts there,
    else the rest of the line up to the end of the sentence, with trailing punctuation, ``$`` and
    markdown ``*`` trimmed.
    """

    name: str
    lead_in: str


DEFAULT_FALLBACK_PATTERNS: tuple[FallbackPattern, ...] = (
    FallbackPattern("final_answer", r"\bfinal\s+answer\s*\**\s*(?:is\b|:)"),
    FallbackPattern("answer_is", r"\banswer\s+is\b"),
    FallbackPattern("answer_colon", r"\banswer\s*\**\s*:"),
)

_BOX_RE = re.compile(r"\\(boxed|fbox)(?![A-Za-z])")
_THINK_OPEN = "<think>"
_THINK_CLOSE = "</think>"
_MATH_GROUP_RE = re.compile(
    r"\$\$(?P<a>.+?)\$\$|\$(?P<b>.+?)\$|\\\((?P<c>.+?)\\\)|\\\[(?P<d>.+?)\\\]", re.S
)
_SENTENCE_END_RE = re.compile(r"\.(?=\s|$)|[;!?](?=\s|$)")
_TRIM_CHARS = " \t\r\n.,;:!?*$"


def _balanced_group(text: str, open_index: int) -> tuple[str, int] | None:
    """The content of the brace group opening at ``open_index`` and the index after it.

    Escaped characters (``\\{``, ``\\}``, ``\\\\``) are skipped, so ``\\{1,2\\}`` and
    ``\\left\\{ ... \\right.`` do not unbalance the count. ``None`` if the group never closes.
    """
    depth = 0
    k = open_index
    n = len(text)
    while k < n:
        ch = text[k]
        if ch == "\\":
            k += 2
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[open_index + 1 : k], k + 1
        k += 1
    return None


def _boxes(text: str) -> list[tuple[str, str]]:
    """All well-formed, non-empty ``\\boxed``/``\\fbox`` answers in order, as (rule, content)."""
    found: list[tuple[str, str]] = []
    for match in _BOX_RE.finditer(text):
        j = match.end()
        while j < len(text) and text[j].isspace():
            j += 1
        if j >= len(text):
            continue
        if text[j] == "{":
            group = _balanced_group(text, j)
            if group is None:  # truncated box: skip it, an earlier complete one may exist
                continue
            content = group[0]
        else:  # `\boxed 5` / `\boxed5`: one whitespace- or `$`-delimited token
            token = re.match(r"[^\s$]+", text[j:])
            content = token.group(0).rstrip(".,;:!?") if token else ""
        content = content.strip()
        if content:
            found.append((match.group(1), content))
    return found


def _value_after(text: str) -> str | None:
    """The answer value at the start of ``text`` (what follows a fallback lead-in)."""
    rest = text.lstrip(" \t*:")
    math_group = _MATH_GROUP_RE.match(rest)
    if math_group is not None:
        value = next(g for g in math_group.groups() if g is not None)
    else:
        value = rest.split("\n", 1)[0]
        end = _SENTENCE_END_RE.search(value)
        if end is not None:
            value = value[: end.start()]
    value = value.strip(_TRIM_CHARS)
    inner = _boxes(value)
    if inner:
        value = inner[-1][1]
    return value or None


def _fallback(text: str, patterns: Sequence[FallbackPattern]) -> Extraction | None:
    best: tuple[int, int, str, str] | None = None  # (end of lead-in, -priority, name, value)
    for priority, pattern in enumerate(patterns):
        for match in re.finditer(pattern.lead_in, text, flags=re.IGNORECASE):
            value = _value_after(text[match.end() :])
            if value is None:
                continue
            key = (match.end(), -priority, pattern.name, value)
            if best is None or key[:2] > best[:2]:
                best = key
    if best is None:
        return None
    return Extraction(answer=best[3], rule=f"fallback:{best[2]}")


def extract_answer(
    model_output: str,
    *,
    strip_thinking: bool = True,
    fallback_patterns: Sequence[FallbackPattern] | None = DEFAULT_FALLBACK_PATTERNS,
) -> Extraction:
    """Extract the final answer from a model output.

    1. ``strip_thinking``: keep only what follows the last ``</think>``; an output that opens
       ``<think>`` and never closes it has no final answer (``rule="unclosed_think"``). Outputs
       with neither tag are used whole (non-thinking mode, or a template that put ``<think>`` in
       the prompt and the model never closed it -- indistinguishable from here).
    2. The last well-formed, non-empty ``\\boxed{...}``/``\\fbox{...}`` (or ``\\boxed 5``).
    3. Otherwise the latest fallback phrase (``fallback_patterns``; ``None`` or ``()`` disables
       them); at equal positions the earlier pattern in the sequence wins.
    """
    text = model_output
    if strip_thinking:
        close = text.rfind(_THINK_CLOSE)
        if close >= 0:
            text = text[close + len(_THINK_CLOSE) :]
        elif _THINK_OPEN in text:
            return Extraction(answer=None, rule="unclosed_think")
    boxes = _boxes(text)
    if boxes:
        rule, content = boxes[-1]
        return Extraction(answer=content, rule=rule)
    if fallback_patterns:
        found = _fallback(text, fallback_patterns)
        if found is not None:
            return found
    return Extraction(answer=None, rule="none")


def _reference_text(reference_answer: str) -> str:
    """The bare reference answer: last box content if boxed, math delimiters removed."""
    s = reference_answer.strip()
    boxes = _boxes(s)
    if boxes:
        return boxes[-1][1]
    math_group = _MATH_GROUP_RE.fullmatch(s)
    if math_group is not None:
        s = next(g for g in math_group.groups() if g is not None)
    return s.strip()


# --------------------------------------------------------------------------------------------
# String normalization (the fallback comparison)
# --------------------------------------------------------------------------------------------

_TEXT_CMDS = r"(?:text|textbf|textit|textrm|mathrm|mathbf|mbox|operatorname)"
_UNIT_AFTER_VALUE_RE = re.compile(
    r"(?P<value>.*?[\d}])\s*\\" + _TEXT_CMDS + r"\s*\{\s*[A-Za-z][A-Za-z .]*\}(?:\^\{?[23]\}?)?"
)
_PLAIN_UNIT_RE = re.compile(r"(?P<value>[-+]?[\d.,]+)\s+[A-Za-z]{2,}(?:\^\{?[23]\}?)?")
_THOUSANDS_RE = re.compile(r"[-+]?\d{1,3}(?:(?:,|\{,\})\d{3})+(?:\.\d+)?")
_PLAIN_NUMBER_RE = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)")
_SPACING_RE = re.compile(r"\\[,;:! ]|\\q?quad(?![A-Za-z])|~")
_SIZING_RE = re.compile(r"\\(?:left|right|big|Big|bigg|Bigg)(?:\.|(?![A-Za-z]))")
_DEGREE_RE = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|\\circ(?![A-Za-z])|°|\\degree(?![A-Za-z])")
_WS_RE = re.compile(r"\s+")


def _squeeze_spaces(s: str) -> str:
    """Remove whitespace except a single space between two letters (``\\pi r``, ``no solution``)."""

    def keep(match: re.Match[str]) -> str:
        before = s[match.start() - 1] if match.start() > 0 else ""
        after = s[match.end()] if match.end() < len(s) else ""
        return " " if before.isalpha() and after.isalpha() else ""

    return _WS_RE.sub(keep, s)


def normalize_answer(answer: str) -> str:
    """Canonical string form of an answer for the string comparison (and majority vote).

    Removes: math delimiters and ``$``, ``\\boxed{}`` around the whole answer, ``\\left``/
    ``\\right``/``\\big`` sizing, spacing commands (``\\!``, ``\\,``, ``\\quad``, ``~``),
    ``\\displaystyle``, degree marks (``^\\circ``, ``°``), percent signs (``50\\%`` -> ``50``: a
    percentage is compared by its number, as ``math_verify`` does), a trailing unit
    (``5\\text{ cm}``, ``5 cm``), trailing ``.``, thousands separators in a plain number
    (``1,000`` -> ``1000``) and whitespace (except between two letters). Rewrites
    ``\\dfrac``/``\\tfrac`` -> ``\\frac``, ``\\frac12`` -> ``\\frac{1}{2}``, ``\\sqrt2`` ->
    ``\\sqrt{2}``, ``\\text{X}`` -> ``X``, ``(A)`` -> ``A``, plain numbers to their canonical
    decimal (``2.50`` -> ``2.5``), and words to lower case. Intervals keep their brackets
    (``[0,1)`` and ``(0,1)`` stay different).
    """
    s = _reference_text(answer)
    s = s.replace("\\$", "").replace("$", "")
    s = _SIZING_RE.sub("", s)
    s = re.sub(r"\\(?:displaystyle|limits)(?![A-Za-z])", "", s)
    s = re.sub(r"\\[dt]frac(?![A-Za-z])", r"\\frac", s)
    s = _SPACING_RE.sub(" ", s)
    s = _DEGREE_RE.sub("", s)
    s = s.replace("\\%", "").replace("%", "")
    s = s.strip()
    s = re.sub(r"\\varnothing(?![A-Za-z])", r"\\emptyset", s)
    s = re.sub(r"\\le(?![A-Za-z])", r"\\leq", s)
    s = re.sub(r"\\ge(?![A-Za-z])", r"\\geq", s)
    unit = _UNIT_AFTER_VALUE_RE.fullmatch(s) or _PLAIN_UNIT_RE.fullmatch(s)
    if unit is not None:
        s = unit.group("value")
    s = re.sub(r"\\" + _TEXT_CMDS + r"\s*\{([^{}]*)\}", r"\1", s)
    s = re.sub(r"\\frac\s*(\d)\s*(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\frac\s*(\d)\s*\{", r"\\frac{\1}{", s)
    s = re.sub(r"\\frac\s*(\{[^{}]*\})\s*(\d)", r"\\frac\1{\2}", s)
    s = re.sub(r"\\sqrt\s*(\d)", r"\\sqrt{\1}", s)
    s = _squeeze_spaces(s.strip())
    s = s.rstrip(".").strip()
    if _THOUSANDS_RE.fullmatch(s):
        s = s.replace("{,}", "").replace(",", "")
    if _PLAIN_NUMBER_RE.fullmatch(s):
        try:
            number = Decimal(s)
        except InvalidOperation:  # pragma: no cover - the regex only admits valid decimals
            pass
        else:
            s = "0" if number == 0 else format(number.normalize(), "f")
    choice = re.fullmatch(r"\(([A-Za-z])\)", s)
    if choice is not None:
        s = choice.group(1)
    if len(s) > 1 and re.fullmatch(r"[A-Za-z]+(?: [A-Za-z]+)*", s):
        s = s.lower()
    return s


# --------------------------------------------------------------------------------------------
# Exact comparison of plain numbers
# --------------------------------------------------------------------------------------------

_DECIMAL = r"(?:\d+(?:\.\d*)?|\.\d+)"
_EXPONENT = r"(?:\{(?P<braced>[-+]?\d+)\}|(?P<bare>[-+]?\d+))"
_DECIMAL_RE = re.compile(_DECIMAL)
_E_NOTATION_RE = re.compile(rf"(?P<mantissa>{_DECIMAL})[eE](?P<exp>[-+]?\d+)")
_TIMES_TEN_RE = re.compile(rf"(?P<mantissa>{_DECIMAL})(?:\\times|\\cdot|×|\*)10\^{_EXPONENT}")
_POWER_RE = re.compile(rf"(?P<base>\d+)\^{_EXPONENT}")
#: Largest exponent (and digits of a power's value) an exact parse accepts: beyond it the
#: value is not a "plain number" any more and math_verify decides (in its time-limited helper).
_MAX_EXPONENT = 1000
_MAX_POWER_DIGITS = 10_000


def _exponent(match: re.Match[str]) -> int | None:
    text = match.group("braced") if match.group("braced") is not None else match.group("bare")
    value = int(text)
    return value if abs(value) <= _MAX_EXPONENT else None


def _unsigned_number(s: str) -> Fraction | None:
    if _DECIMAL_RE.fullmatch(s):
        return Fraction(Decimal(s))
    if (m := _E_NOTATION_RE.fullmatch(s)) is not None:
        exp = int(m.group("exp"))
        return Fraction(Decimal(m.group("mantissa"))) * Fraction(10) ** exp
    if (m := _TIMES_TEN_RE.fullmatch(s)) is not None:
        exp = _exponent(m)
        return None if exp is None else Fraction(Decimal(m.group("mantissa"))) * Fraction(10) ** exp
    if (m := _POWER_RE.fullmatch(s)) is not None:
        base, exp = int(m.group("base")), _exponent(m)
        if exp is None or (base == 0 and exp < 0):
            return None
        if len(str(base)) * abs(exp) > _MAX_POWER_DIGITS:
            return None
        return Fraction(base) ** exp
    if s.startswith("\\frac{"):
        numerator = _balanced_group(s, len("\\frac"))
        if numerator is None or not s.startswith("{", numerator[1]):
            return None
        denominator = _balanced_group(s, numerator[1])
        if denominator is None or denominator[1] != len(s):
            return None
        return _ratio(_signed_number(numerator[0]), _signed_number(denominator[0]))
    if s.count("/") == 1 and "{" not in s:
        top, bottom = s.split("/")
        return _ratio(_signed_number(top), _signed_number(bottom))
    return None


def _ratio(top: Fraction | None, bottom: Fraction | None) -> Fraction | None:
    if top is None or bottom is None or bottom == 0:
        return None
    return top / bottom


def _signed_number(s: str) -> Fraction | None:
    s = s.strip()
    while s.startswith("{") and _balanced_group(s, 0) == (s[1:-1], len(s)):
        s = s[1:-1].strip()
    sign = 1
    if s[:1] in ("-", "+"):
        sign, s = (-1 if s[0] == "-" else 1), s[1:].lstrip()
    value = _unsigned_number(s)
    return None if value is None else sign * value


def exact_number(answer: str) -> Fraction | None:
    """The exact value of ``answer`` when it is a plain number, else ``None``.

    Plain numbers are integers and decimals (``-12``, ``0.0000001``, ``.5``), with thousands
    separators (``1,000,000``, ``1{,}000``, ``1\\,000``), percentages (compared by their number,
    as :func:`normalize_answer` does: ``50\\%`` is 50), scientific notation (``1.5e-7``,
    ``1.5\\times10^{-7}``, ``6.02\\cdot 10^{23}``), integer powers (``2^{98}``, ``10^{-3}``),
    and fractions of these (``\\frac{1}{2^{98}}``, ``-3/4``, ``\\dfrac{-1}{2}``). The value is a
    :class:`fractions.Fraction`, so two plain numbers compare exactly: no rounding, no floating
    point (``0.0000001 != 0.0000002``, ``1/2^{98} != 1/2^{99}``). Exponents beyond
    ``±1000`` (or powers of more than 10,000 digits) are not plain numbers.
    """
    s = normalize_answer(answer).replace("−", "-")
    return _signed_number(s) if s else None


# --------------------------------------------------------------------------------------------
# Time-limited calls in helper subprocesses
# --------------------------------------------------------------------------------------------


class GradingTimeout(TimeoutError):
    """A call run through :func:`call_with_timeout` did not finish within its time limit."""


class VerifierError(RuntimeError):
    """A helper process died (or its pipe broke) while running a call."""


class VerifierUnavailable(VerifierError):
    """No helper process could be started (bad interpreter, ``math_verify`` not installed...)."""


_HEADER = struct.Struct(">Q")
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[1])
_BOOTSTRAP = "import opsd_engine.grading as g; g._helper_main()"


def _send(stream: Any, obj: object) -> None:
    payload = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(_HEADER.pack(len(payload)) + payload)
    stream.flush()


def _read_exact(stream: Any, size: int) -> bytes | None:
    chunks = bytearray()
    while len(chunks) < size:
        chunk = stream.read(size - len(chunks))
        if not chunk:
            return None
        chunks += chunk
    return bytes(chunks)


class _Helper:
    """One helper subprocess and the parent's end of its pipes. Used by one thread at a time."""

    def __init__(self, memory_limit_mb: int | None, startup_timeout: float) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH", "")) if p
        )
        limit = str(memory_limit_mb) if memory_limit_mb else "0"
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", _BOOTSTRAP, limit],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                env=env,
                close_fds=True,
            )
        except OSError as exc:
            raise VerifierUnavailable(f"cannot start a math_verify helper process: {exc}") from exc
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self._stdin = self.proc.stdin
        self._fd = self.proc.stdout.fileno()
        self._buffer = bytearray()
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._fd, selectors.EVENT_READ)
        try:
            status, detail = self._receive(startup_timeout)
        except (GradingTimeout, VerifierError) as exc:
            self.kill()
            raise VerifierUnavailable(f"math_verify helper process failed to start: {exc}") from exc
        if status != "ready":
            self.kill()
            raise VerifierUnavailable(f"math_verify helper process failed to start: {detail}")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def _receive(self, timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            if len(self._buffer) >= _HEADER.size:
                (size,) = _HEADER.unpack_from(self._buffer)
                if len(self._buffer) >= _HEADER.size + size:
                    payload = bytes(self._buffer[_HEADER.size : _HEADER.size + size])
                    del self._buffer[: _HEADER.size + size]
                    return pickle.loads(payload)
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self._selector.select(remaining):
                raise GradingTimeout(f"no answer within {timeout:g} s")
            chunk = os.read(self._fd, 1 << 16)
            if not chunk:
                raise VerifierError(f"helper process exited (code {self.proc.wait()})")
            self._buffer += chunk

    def call(self, fn: Callable[..., T], args: tuple[Any, ...], timeout: float) -> T:
        try:
            _send(self._stdin, (fn, args))
        except (BrokenPipeError, OSError) as exc:
            raise VerifierError(f"helper process is gone: {exc}") from exc
        status, value = self._receive(timeout)
        if status == "error":
            raise value
        return value

    def close(self) -> None:
        """Ask an idle helper to exit (EOF on stdin); kill it if it does not."""
        with contextlib.suppress(OSError):
            self._stdin.close()
        try:
            self.proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            self.kill()
        self._cleanup()

    def kill(self) -> None:
        with contextlib.suppress(OSError):
            self.proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)
        with contextlib.suppress(OSError):
            self._stdin.close()
        self._cleanup()

    def _cleanup(self) -> None:
        with contextlib.suppress(Exception):
            self._selector.close()
        if self.proc.stdout is not None:
            with contextlib.suppress(OSError):
                self.proc.stdout.close()


class VerifierPool:
    """Persistent helper subprocesses that run picklable calls under a hard time limit.

    ``call(fn, *args, timeout=...)`` runs ``fn(*args)`` in a helper and returns its result or
    re-raises its exception; past ``timeout`` seconds the helper is killed and
    :class:`GradingTimeout` is raised. ``fn`` is pickled by reference, so it must be a
    module-level function importable in a fresh interpreter (the helper gets this package's root
    prepended to ``PYTHONPATH``); arguments and results must be picklable.

    Thread-safe; at most ``max_workers`` (default: ``min(4, cpu_count)``) helpers run calls at
    once (others wait for a free one, not counted in ``timeout``). Helpers are started on demand
    (startup is not counted in ``timeout`` but bounded by ``startup_timeout``) and kept for reuse.
    ``memory_limit_mb`` caps each helper's address space (``RLIMIT_AS``; ``None`` for no cap) so
    a runaway computation fails with ``MemoryError`` instead of exhausting the machine. After
    ``os.fork`` the child process starts its own helpers and leaves the parent's alone.
    """

    def __init__(
        self,
        max_workers: int | None = None,
        *,
        memory_limit_mb: int | None = 4096,
        startup_timeout: float = 60.0,
    ) -> None:
        if max_workers is None:
            max_workers = min(4, os.cpu_count() or 1)
        if max_workers < 1:
            raise ValueError(f"max_workers must be >= 1, got {max_workers}")
        self.max_workers = max_workers
        self.memory_limit_mb = memory_limit_mb
        self.startup_timeout = startup_timeout
        self._reset()

    def _reset(self) -> None:
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(self.max_workers)
        self._idle: list[_Helper] = []
        self._closed = False

    def _check_fork(self) -> None:
        if os.getpid() != self._pid:  # forked: the helpers (and locks) belong to the parent
            self._reset()

    def call(self, fn: Callable[..., T], *args: Any, timeout: float) -> T:
        if not timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
        self._check_fork()
        if self._closed:
            raise VerifierError("the verifier pool is closed")
        with self._slots:
            helper = self._checkout()
            healthy = False
            try:
                result = helper.call(fn, args, timeout)
                healthy = True
                return result
            except (GradingTimeout, VerifierError):
                raise
            except BaseException:
                healthy = helper.alive()  # an exception raised by fn: the helper is fine
                raise
            finally:
                if healthy:
                    self._checkin(helper)
                else:
                    helper.kill()

    def _checkout(self) -> _Helper:
        with self._lock:
            while self._idle:
                helper = self._idle.pop()
                if helper.alive():
                    return helper
                helper.kill()
        return _Helper(self.memory_limit_mb, self.startup_timeout)

    def _checkin(self, helper: _Helper) -> None:
        with self._lock:
            if not self._closed:
                self._idle.append(helper)
                return
        helper.close()

    def close(self) -> None:
        """Stop the idle helpers; helpers busy in another thread stop when their call ends."""
        if os.getpid() != self._pid:
            return
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for helper in idle:
            helper.close()

    def __enter__(self) -> VerifierPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_default_pool: VerifierPool | None = None
_default_pool_lock = threading.Lock()


def _after_fork_in_child() -> None:
    global _default_pool_lock
    _default_pool_lock = threading.Lock()  # another thread may have held it at fork time


os.register_at_fork(after_in_child=_after_fork_in_child)


def _get_default_pool() -> VerifierPool:
    global _default_pool
    with _default_pool_lock:
        if _default_pool is None:
            _default_pool = VerifierPool()
            atexit.register(_default_pool.close)
        return _default_pool


def call_with_timeout(fn: Callable[..., T], *args: Any, timeout: float) -> T:
    """Run ``fn(*args)`` in a helper process of the shared :class:`VerifierPool`.

    Returns its result or re-raises its exception; raises :class:`GradingTimeout` after
    ``timeout`` seconds (the helper is killed) and :class:`VerifierError` if no helper can run it.
    Safe from any thread. ``fn`` must be importable by reference (a module-level function).
    """
    return _get_default_pool().call(fn, *args, timeout=timeout)


def _helper_main() -> None:
    """Entry point of a helper subprocess: answer pickled ``(fn, args)`` requests on stdin."""
    out = os.fdopen(os.dup(1), "wb")  # private protocol channel...
    os.dup2(2, 1)  # ...so stray prints from libraries go to stderr instead of corrupting it
    inp = sys.stdin.buffer
    limit_mb = int(sys.argv[1]) if len(sys.argv) > 1 else 0
    try:
        if limit_mb > 0:
            import resource

            limit = limit_mb * 1024 * 1024
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        # Timeouts are enforced by the parent; silence math_verify's warning about that.
        for name in ("math_verify", "latex2sympy2_extended"):
            logging.getLogger(name).setLevel(logging.ERROR)
        _math_verify_equal("1", "1")  # import and warm up before reporting ready
    except BaseException as exc:
        _send(out, ("failed", f"{type(exc).__name__}: {exc}"))
        return
    parent = os.getppid()

    def watch_parent() -> None:  # exit if the parent dies while we compute
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch_parent, daemon=True).start()
    _send(out, ("ready", os.getpid()))
    with contextlib.suppress(KeyboardInterrupt, BrokenPipeError):  # Ctrl-C / parent gone: exit
        while True:
            header = _read_exact(inp, _HEADER.size)
            payload = _read_exact(inp, _HEADER.unpack(header)[0]) if header else None
            if payload is None:  # EOF: the parent closed the pool
                return
            try:
                fn, args = pickle.loads(payload)
                reply: tuple[str, Any] = ("ok", fn(*args))
            except (KeyboardInterrupt, SystemExit):
                raise
            except BaseException as exc:
                try:
                    pickle.dumps(exc)
                    reply = ("error", exc)
                except Exception:
                    reply = ("error", RuntimeError(f"{type(exc).__name__}: {exc}"))
            _send(out, reply)


def _math_verify_equal(gold: str, prediction: str) -> bool | None:
    """``math_verify.verify(parse(gold), parse(prediction))``; ``None`` if a side does not parse.

    Runs inside a helper process (no signal-based timeouts there). Each side is tried as
    ``\\boxed{...}``, then ``$...$``, then as plain text.
    """
    from math_verify import parse, verify

    _install_exact_numeric_comparison()

    def parsed(answer: str) -> list[Any]:
        for candidate in (f"\\boxed{{{answer}}}", f"${answer}$", answer):
            result = parse(candidate, parsing_timeout=None)  # type: ignore[arg-type]
            if result:
                return list(result)
        return []

    gold_parsed = parsed(gold)
    prediction_parsed = parsed(prediction)
    if not gold_parsed or not prediction_parsed:
        return None
    return bool(verify(gold_parsed, prediction_parsed, timeout_seconds=None))


def _install_exact_numeric_comparison() -> None:
    """Make math_verify compare numbers exactly (in the helper process only).

    ``math_verify.grader.sympy_numeric_eq`` rounds: a Float side is compared after
    ``round(float_rounding=6)`` (``1.0000001 == 1.0000004``), and otherwise the difference is
    evaluated to 15 digits with ``chop=True`` (``1/2^98 - 1/2^99`` chops to 0). Every numeric
    comparison of math_verify (plain values, set/tuple/interval elements, equation sides,
    matrix entries) goes through that one function, so it is replaced by
    :func:`_exact_numeric_eq`: Floats become the exact decimals they were written as, and two
    values are equal only when their difference simplifies to exactly 0. Symbolic equality
    (``sympy_symbolic_eq``) is untouched.
    """
    import math_verify.grader as grader

    if getattr(grader, "sympy_numeric_eq", None) is not _exact_numeric_eq:
        if not hasattr(grader, "sympy_numeric_eq"):  # pragma: no cover - a math_verify change
            raise RuntimeError("math_verify.grader.sympy_numeric_eq is gone; update grading.py")
        grader.sympy_numeric_eq = _exact_numeric_eq


def _exact_numeric_eq(a: Any, b: Any, float_rounding: int, numeric_precision: int) -> bool:
    """math_verify's ``sympy_numeric_eq`` signature, without rounding (see above)."""
    from math_verify.grader import get_pct_val, safe_sympy_doit
    from sympy import Float, MatrixBase, Rational, simplify

    a, b = safe_sympy_doit(a), safe_sympy_doit(b)
    if isinstance(a, MatrixBase) or isinstance(b, MatrixBase):
        if not (isinstance(a, MatrixBase) and isinstance(b, MatrixBase)) or a.shape != b.shape:
            return False
        return all(
            _exact_numeric_eq(x, y, float_rounding, numeric_precision)
            for x, y in zip(a.flat(), b.flat(), strict=True)
        )
    # a percentage is compared by its number (9\% == 9), as math_verify and the string rule do
    a, b = get_pct_val(a, a), get_pct_val(b, b)
    try:
        exact = [e.xreplace({f: Rational(str(f)) for f in e.atoms(Float)}) for e in (a, b)]
        difference = exact[0] - exact[1]
        if difference == 0:
            return True
        if difference.free_symbols:
            return False  # symbolic: math_verify's sympy_symbolic_eq decides next
        return bool(simplify(difference) == 0)
    except Exception:
        return False


# --------------------------------------------------------------------------------------------
# Grading
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    """The grade of one model output; ``decided_by`` is one of :data:`DECIDED_BY`."""

    correct: bool
    extracted: str | None
    extraction_rule: str
    decided_by: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def grade(
    model_output: str,
    reference_answer: str,
    *,
    strip_thinking: bool = True,
    timeout: float = 5.0,
) -> Verdict:
    """Grade ``model_output`` against ``reference_answer`` (bare, ``$...$`` or ``\\boxed{}``).

    Extraction as in :func:`extract_answer`; no answer -> incorrect (``"no_answer"``). Equal
    :func:`normalize_answer` forms -> correct (``"string_match"``). Two plain numbers
    (:func:`exact_number`) are compared exactly (``"exact_number"``): a verdict never rests on
    rounding. Otherwise ``math_verify.verify(gold, prediction)`` decides (``"math_verify"``), with
    its numeric comparisons made exact (:func:`_install_exact_numeric_comparison`), run in a helper
    process under ``timeout`` seconds; if it cannot parse one side, or times out, or its helper
    dies, the
    (failed) string comparison stands: incorrect, with ``"string_match"``,
    ``"timeout->string_match"`` or ``"error->string_match"``. Safe to call from any thread.
    """
    if not timeout > 0:
        raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
    gold = _reference_text(reference_answer)
    if not gold:
        raise ValueError("reference_answer is empty")
    extraction = extract_answer(model_output, strip_thinking=strip_thinking)
    if extraction.answer is None:
        return Verdict(False, None, extraction.rule, "no_answer")

    def verdict(correct: bool, decided_by: str) -> Verdict:
        return Verdict(correct, extraction.answer, extraction.rule, decided_by)

    if normalize_answer(gold) == normalize_answer(extraction.answer):
        return verdict(True, "string_match")
    gold_value, answer_value = exact_number(gold), exact_number(extraction.answer)
    if gold_value is not None and answer_value is not None:
        return verdict(gold_value == answer_value, "exact_number")
    try:
        equal = call_with_timeout(_math_verify_equal, gold, extraction.answer, timeout=timeout)
    except GradingTimeout:
        logger.warning("math_verify timed out after %g s; using the string comparison", timeout)
        return verdict(False, "timeout->string_match")
    except VerifierUnavailable:
        raise
    except VerifierError as exc:
        logger.warning("math_verify helper died (%s); using the string comparison", exc)
        return verdict(False, "error->string_match")
    except Exception as exc:  # math_verify itself raised: fall back, do not fail the batch
        logger.warning("math_verify raised %s; using the string comparison", exc)
        return verdict(False, "error->string_match")
    if equal is None:
        return verdict(False, "string_match")
    return verdict(equal, "math_verify")


def is_correct(model_output: str, reference_answer: str) -> bool:
    """Whether ``model_output`` answers ``reference_answer`` (:func:`grade` with defaults)."""
    return grade(model_output, reference_answer).correct


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------


def _as_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    return int(value)  # type: ignore[call-overload]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``n`` samples of which ``c`` are correct: ``1 - C(n-c,k) / C(n,k)``.

    Computed as ``1 - prod_{i=n-c+1}^{n} (1 - k/i)`` (no big binomials); exactly ``1.0`` when
    ``n - c < k``. Requires ``0 <= c <= n`` and ``1 <= k <= n``.
    """
    n, c, k = _as_int("n", n), _as_int("c", c), _as_int("k", k)
    if n < 1:
        raise ValueError(f"n must be >= 1, got n={n}")
    if not 0 <= c <= n:
        raise ValueError(f"c must satisfy 0 <= c <= n, got c={c}, n={n}")
    if not 1 <= k <= n:
        raise ValueError(f"k must satisfy 1 <= k <= n, got k={k}, n={n}")
    if n - c < k:
        return 1.0
    product = 1.0
    for i in range(n - c + 1, n + 1):
        product *= 1.0 - k / i
    return 1.0 - product


def avg_at_k(correct: Sequence[bool]) -> float:
    """Mean accuracy over the k samples of one problem (the paper's average@k for one problem)."""
    if len(correct) == 0:
        raise ValueError("avg_at_k needs at least one sample")
    return sum(bool(x) for x in correct) / len(correct)


def majority_vote(answers: Sequence[str | None], correct: Sequence[bool]) -> bool:
    """Whether the most frequent answer is correct.

    Answers are grouped by :func:`normalize_answer` (so ``\\frac{1}{2}`` and ``0.5`` are different
    votes); ``None`` (no answer) does not vote; ties go to the answer seen first. The group's
    correctness is that of its first occurrence. ``False`` when no sample has an answer.
    """
    if len(answers) != len(correct):
        raise ValueError(
            f"answers and correct must have the same length, got {len(answers)} and {len(correct)}"
        )
    counts: dict[str, int] = {}
    first: dict[str, int] = {}
    for index, answer in enumerate(answers):
        if answer is None:
            continue
        key = normalize_answer(answer)
        counts[key] = counts.get(key, 0) + 1
        first.setdefault(key, index)
    if not counts:
        return False
    winner = max(counts, key=lambda key: (counts[key], -first[key]))
    return bool(correct[first[winner]])


@dataclass(frozen=True)
class ProblemSummary:
    """One problem of a benchmark: ``c`` correct out of ``n`` samples."""

    index: int
    n: int
    c: int
    avg: float
    pass_at_k: dict[int, float]
    majority_correct: bool | None = None

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["pass_at_k"] = {str(k): v for k, v in self.pass_at_k.items()}
        return out


@dataclass(frozen=True)
class BenchmarkSummary:
    """A benchmark's metrics over ``n_problems`` problems with ``n_samples`` samples each.

    ``avg_at_n`` is the mean per-problem accuracy (the paper's average@16 for n=16);
    ``pass_at_k[k]`` the mean unbiased pass@k for every k in 1..n (``pass_at_k[1] == avg_at_n``);
    ``majority_vote`` the fraction of problems whose majority answer is correct (``None`` without
    answers). ``total_samples = n_problems * n_samples``. Fractions are in [0, 1].
    """

    n_problems: int
    n_samples: int
    total_samples: int
    avg_at_n: float
    pass_at_k: dict[int, float]
    majority_vote: float | None
    problems: list[ProblemSummary] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (``pass_at_k`` keys become strings)."""
        return {
            "n_problems": self.n_problems,
            "n_samples": self.n_samples,
            "total_samples": self.total_samples,
            "avg_at_n": self.avg_at_n,
            "pass_at_k": {str(k): v for k, v in self.pass_at_k.items()},
            "majority_vote": self.majority_vote,
            "problems": [p.to_dict() for p in self.problems],
        }


def summarize(
    per_problem: Sequence[Sequence[bool]],
    answers: Sequence[Sequence[str | None]] | None = None,
) -> BenchmarkSummary:
    """Benchmark metrics from per-problem correctness (and optionally extracted answers).

    Every problem must have the same number of samples n >= 1; ``answers``, if given, must have
    the same shape as ``per_problem``.
    """
    if len(per_problem) == 0:
        raise ValueError("summarize needs at least one problem")
    sizes = {len(samples) for samples in per_problem}
    if len(sizes) != 1:
        raise ValueError(
            f"all problems must have the same number of samples, got sizes {sorted(sizes)}"
        )
    n = sizes.pop()
    if n < 1:
        raise ValueError("every problem needs at least one sample")
    if answers is not None:
        if len(answers) != len(per_problem):
            raise ValueError(
                f"answers has {len(answers)} problems but per_problem has {len(per_problem)}"
            )
        for index, (row, samples) in enumerate(zip(answers, per_problem, strict=True)):
            if len(row) != len(samples):
                raise ValueError(f"problem {index}: {len(row)} answers for {len(samples)} samples")
    problems: list[ProblemSummary] = []
    for index, samples in enumerate(per_problem):
        c = sum(bool(x) for x in samples)
        problems.append(
            ProblemSummary(
                index=index,
                n=n,
                c=c,
                avg=avg_at_k(samples),
                pass_at_k={k: pass_at_k(n, c, k) for k in range(1, n + 1)},
                majority_correct=(
                    majority_vote(answers[index], samples) if answers is not None else None
                ),
            )
        )
    m = len(problems)
    return BenchmarkSummary(
        n_problems=m,
        n_samples=n,
        total_samples=m * n,
        avg_at_n=math.fsum(p.avg for p in problems) / m,
        pass_at_k={k: math.fsum(p.pass_at_k[k] for p in problems) / m for k in range(1, n + 1)},
        majority_vote=(
            sum(bool(p.majority_correct) for p in problems) / m if answers is not None else None
        ),
        problems=problems,
    )
