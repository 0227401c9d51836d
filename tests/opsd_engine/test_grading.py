"""Tests for opsd_engine.grading: extraction, equivalence, time limits, pass@k and summaries."""

from __future__ import annotations

import concurrent.futures
import itertools
import json
import math
import subprocess
import sys
import threading
import time
from fractions import Fraction

import pytest

from opsd_engine.grading import (
    DECIDED_BY,
    Extraction,
    FallbackPattern,
    GradingTimeout,
    Verdict,
    VerifierError,
    VerifierPool,
    VerifierUnavailable,
    avg_at_k,
    call_with_timeout,
    exact_number,
    extract_answer,
    grade,
    is_correct,
    majority_vote,
    normalize_answer,
    pass_at_k,
    summarize,
)

# --------------------------------------------------------------------------------------------
# Extraction + equivalence on realistic outputs
# --------------------------------------------------------------------------------------------

MV, SM, NA, TO = "math_verify", "string_match", "no_answer", "timeout->string_match"
EX = "exact_number"

# (id, model output, reference, strip_thinking, correct, extracted, rule, decided_by)
GRADE_CASES: list[tuple[str, str, str, bool, bool, str | None, str, str]] = [
    # fractions and nested braces
    (
        "nested-frac-vs-slash",
        r"Thus $\boxed{\frac{1}{2}}$.",
        "1/2",
        True,
        True,
        r"\frac{1}{2}",
        "boxed",
        EX,
    ),
    ("frac-vs-decimal", r"\boxed{\frac{1}{2}}", "0.5", True, True, r"\frac{1}{2}", "boxed", EX),
    ("decimal-vs-frac-shorthand", r"\boxed{0.5}", r"\frac12", True, True, "0.5", "boxed", EX),
    (
        "dfrac-vs-frac",
        r"\boxed{\dfrac{1}{2}}",
        r"\frac{1}{2}",
        True,
        True,
        r"\dfrac{1}{2}",
        "boxed",
        SM,
    ),
    ("tfrac-vs-decimal", r"\boxed{\tfrac{3}{4}}", "0.75", True, True, r"\tfrac{3}{4}", "boxed", EX),
    ("third-vs-rounded", r"\boxed{\frac{1}{3}}", "0.33", True, False, r"\frac{1}{3}", "boxed", EX),
    (
        "dfrac-sqrt-in-dollars",
        r"$\boxed{\dfrac{\sqrt{3}}{2}}$",
        r"\frac{\sqrt{3}}{2}",
        True,
        True,
        r"\dfrac{\sqrt{3}}{2}",
        "boxed",
        SM,
    ),
    # intervals: brackets matter
    ("interval-open-vs-halfopen", r"\boxed{[0, 1)}", "(0,1)", True, False, "[0, 1)", "boxed", MV),
    ("interval-same-spacing", r"\boxed{[0,1)}", "[0, 1)", True, True, "[0,1)", "boxed", SM),
    (
        "interval-left-right",
        r"\boxed{\left[0, 1\right)}",
        "[0,1)",
        True,
        True,
        r"\left[0, 1\right)",
        "boxed",
        SM,
    ),
    (
        "interval-infinity",
        r"\boxed{\left(-\infty, 3\right]}",
        r"(-\infty,3]",
        True,
        True,
        r"\left(-\infty, 3\right]",
        "boxed",
        SM,
    ),
    (
        "tuple-left-right",
        r"\boxed{\left( 1, 2 \right)}",
        "(1,2)",
        True,
        True,
        r"\left( 1, 2 \right)",
        "boxed",
        SM,
    ),
    # sets (escaped braces inside the box)
    ("set-reordered", r"\boxed{\{1,2\}}", r"\{2, 1\}", True, True, r"\{1,2\}", "boxed", MV),
    ("set-missing-element", r"\boxed{\{1,2\}}", r"\{1,2,3\}", True, False, r"\{1,2\}", "boxed", MV),
    # percentages: compared by their number (50\% == 50), as math_verify does
    ("percent-vs-number", r"\boxed{50\%}", "50", True, True, r"50\%", "boxed", SM),
    ("number-vs-percent", r"\boxed{50}", r"50\%", True, True, "50", "boxed", SM),
    # units and degrees are dropped
    ("unit-text", r"\boxed{5\text{ cm}}", "5", True, True, r"5\text{ cm}", "boxed", SM),
    (
        "unit-squared",
        r"The area is \boxed{12 \text{ cm}^2}",
        "12",
        True,
        True,
        r"12 \text{ cm}^2",
        "boxed",
        SM,
    ),
    ("unit-currency", r"\boxed{\$5}", "5", True, True, r"\$5", "boxed", SM),
    ("degrees-vs-number", r"\boxed{30^\circ}", "30", True, True, r"30^\circ", "boxed", SM),
    ("degrees-both", r"\boxed{30^{\circ}}", r"30^\circ", True, True, r"30^{\circ}", "boxed", SM),
    # signs
    ("negative-equal", r"\boxed{-3}", "-3", True, True, "-3", "boxed", SM),
    ("sign-differs", r"\boxed{3}", "-3", True, False, "3", "boxed", EX),
    (
        "negative-frac-vs-decimal",
        r"\boxed{-\frac{1}{2}}",
        "-0.5",
        True,
        True,
        r"-\frac{1}{2}",
        "boxed",
        EX,
    ),
    # radicals and symbolic forms
    (
        "sqrt-slash-vs-frac",
        r"\boxed{\sqrt{2}/2}",
        r"\frac{\sqrt2}{2}",
        True,
        True,
        r"\sqrt{2}/2",
        "boxed",
        MV,
    ),
    (
        "sqrt-shorthand",
        r"\boxed{\frac{\sqrt{2}}{2}}",
        r"\frac{\sqrt2}{2}",
        True,
        True,
        r"\frac{\sqrt{2}}{2}",
        "boxed",
        SM,
    ),
    (
        "rationalized",
        r"\boxed{\frac{1}{\sqrt{2}}}",
        r"\frac{\sqrt{2}}{2}",
        True,
        True,
        r"\frac{1}{\sqrt{2}}",
        "boxed",
        MV,
    ),
    (
        "simplified-radical",
        r"\boxed{2\sqrt{3}}",
        r"\sqrt{12}",
        True,
        True,
        r"2\sqrt{3}",
        "boxed",
        MV,
    ),
    ("pi-over-two", r"\boxed{\pi/2}", r"\frac{\pi}{2}", True, True, r"\pi/2", "boxed", MV),
    ("expanded-polynomial", r"\boxed{(x+1)^2}", "x^2+2x+1", True, True, "(x+1)^2", "boxed", MV),
    ("power-of-ten", r"\boxed{10^{6}}", "1000000", True, True, "10^{6}", "boxed", EX),
    ("close-but-wrong", r"\boxed{0.999}", "1", True, False, "0.999", "boxed", EX),
    ("assignment-form", r"\boxed{x = 2}", "2", True, True, "x = 2", "boxed", MV),
    ("choice-letter", r"\boxed{\text{(B)}}", "B", True, True, r"\text{(B)}", "boxed", SM),
    # thousands separators
    ("thousands-comma", r"\boxed{1,000}", "1000", True, True, "1,000", "boxed", SM),
    (
        "thousands-latex",
        r"\boxed{1{,}000{,}000}",
        "1000000",
        True,
        True,
        "1{,}000{,}000",
        "boxed",
        SM,
    ),
    ("reference-with-comma", r"\boxed{1000}", "1,000", True, True, "1000", "boxed", SM),
    # thinking blocks
    (
        "think-wrong-box-inside",
        "<think>Maybe \\boxed{5}? No, recheck.</think>\nSo \\boxed{7}.",
        "7",
        True,
        True,
        "7",
        "boxed",
        SM,
    ),
    (
        "think-inside-box-not-used",
        "<think>Maybe \\boxed{5}? No.</think>\nSo \\boxed{7}.",
        "5",
        True,
        False,
        "7",
        "boxed",
        EX,
    ),
    (
        "think-box-vs-fallback-after",
        "<think>It is \\boxed{5}</think> The answer is 7.",
        "7",
        True,
        True,
        "7",
        "fallback:answer_is",
        SM,
    ),
    (
        "think-kept-box-beats-fallback",
        "<think>It is \\boxed{5}</think> The answer is 7.",
        "5",
        False,
        True,
        "5",
        "boxed",
        SM,
    ),
    (
        "unclosed-think",
        "<think>Let me compute... \\boxed{5} and then",
        "5",
        True,
        False,
        None,
        "unclosed_think",
        NA,
    ),
    (
        "unclosed-think-kept",
        "<think>Let me compute... \\boxed{5} and then",
        "5",
        False,
        True,
        "5",
        "boxed",
        SM,
    ),
    # no answer / fallback phrases
    ("no-answer", "I could not solve this problem.", "3", True, False, None, "none", NA),
    (
        "fallback-final-answer",
        "The final answer is 42.",
        "42",
        True,
        True,
        "42",
        "fallback:final_answer",
        SM,
    ),
    (
        "fallback-math-group",
        "So the answer is $\\frac{3}{4}$, as claimed.",
        "0.75",
        True,
        True,
        r"\frac{3}{4}",
        "fallback:answer_is",
        EX,
    ),
    (
        "fallback-answer-colon",
        "Answer: 1,000",
        "1000",
        True,
        True,
        "1,000",
        "fallback:answer_colon",
        SM,
    ),
    (
        "fallback-markdown",
        "**Final Answer:** 17",
        "17",
        True,
        True,
        "17",
        "fallback:final_answer",
        SM,
    ),
    ("fallback-uppercase", "THE ANSWER IS 9", "9", True, True, "9", "fallback:answer_is", SM),
    (
        "fallback-last-wins",
        "answer: 3. Then, rechecking, the final answer is 4.",
        "4",
        True,
        True,
        "4",
        "fallback:final_answer",
        SM,
    ),
    (
        "empty-box-then-fallback",
        r"\boxed{} The answer is 6",
        "6",
        True,
        True,
        "6",
        "fallback:answer_is",
        SM,
    ),
    # box forms
    ("boxed-space-form", r"The result is \boxed 5.", "5", True, True, "5", "boxed", SM),
    ("fbox", r"\fbox{3}", "3", True, True, "3", "fbox", SM),
    (
        "several-boxes-last-wins",
        r"First \boxed{2}, corrected: \boxed{3}",
        "3",
        True,
        True,
        "3",
        "boxed",
        SM,
    ),
    (
        "several-boxes-first-is-wrong",
        r"First \boxed{2}, corrected: \boxed{3}",
        "2",
        True,
        False,
        "3",
        "boxed",
        EX,
    ),
    ("fbox-after-boxed", r"\boxed{2} and finally \fbox{3}", "3", True, True, "3", "fbox", SM),
    ("truncated-last-box", r"\boxed{4}, or maybe \boxed{5", "4", True, True, "4", "boxed", SM),
    # reference given boxed / in dollars
    ("reference-boxed", r"\boxed{12}", r"\boxed{12}", True, True, "12", "boxed", SM),
    ("reference-dollars", r"\boxed{3}", "$3$", True, True, "3", "boxed", SM),
    ("reference-decimal-zero", r"\boxed{2}", r"\boxed{2.0}", True, True, "2", "boxed", SM),
    ("word-answer-case", r"\boxed{\text{Yes}}", "yes", True, True, r"\text{Yes}", "boxed", SM),
]


@pytest.mark.parametrize(
    ("output", "reference", "strip_thinking", "correct", "extracted", "rule", "decided_by"),
    [case[1:] for case in GRADE_CASES],
    ids=[case[0] for case in GRADE_CASES],
)
def test_grade_table(
    output: str,
    reference: str,
    strip_thinking: bool,
    correct: bool,
    extracted: str | None,
    rule: str,
    decided_by: str,
) -> None:
    verdict = grade(output, reference, strip_thinking=strip_thinking, timeout=10.0)
    assert verdict == Verdict(correct, extracted, rule, decided_by)
    assert verdict.decided_by in DECIDED_BY
    assert extract_answer(output, strip_thinking=strip_thinking) == Extraction(extracted, rule)
    if strip_thinking:
        assert is_correct(output, reference) is correct


def test_grade_table_is_large_and_ids_are_unique() -> None:
    assert len(GRADE_CASES) >= 35
    assert len({case[0] for case in GRADE_CASES}) == len(GRADE_CASES)


# --------------------------------------------------------------------------------------------
# Exactness: no verdict rests on rounding (issue #10, fault 7, and its whole kind)
# --------------------------------------------------------------------------------------------

# (id, extracted answer, reference, correct, decided_by): each right value by exact arithmetic
EXACT_CASES: list[tuple[str, str, str, bool, str]] = [
    # the three cases: math_verify rounded them all to "equal"
    ("issue-seventh-decimal", "0.0000001", "0.0000002", False, EX),
    ("issue-one-plus-1e-7", "1.0000001", "1.0000004", False, EX),
    ("issue-tiny-powers", r"\frac{1}{2^{98}}", r"\frac{1}{2^{99}}", False, EX),
    # other precisions
    ("third-six-digits", "0.333333", r"\frac{1}{3}", False, EX),
    ("third-ten-digits", "0.3333333333", "1/3", False, EX),
    ("pi-digits-vs-decimal", "3.1415927", "3.14159265", False, EX),
    ("ten-decimals-off", "2.0000000001", "2", False, EX),
    ("beyond-double-precision", "1.23456789012345678", "1.23456789012345679", False, EX),
    ("tenth-vs-fraction", "0.1", r"\frac{1}{10}", True, EX),
    ("trailing-zeros", "0.50000", r"\dfrac{1}{2}", True, EX),
    ("negative-fraction-forms", r"\frac{-3}{4}", "-0.75", True, EX),
    ("double-negative-fraction", r"-\frac{-3}{4}", "0.75", True, EX),
    # scientific notation and negative exponents
    ("e-notation-equal", "1e-7", "0.0000001", True, EX),
    ("e-notation-differs", "1e-7", "2e-7", False, EX),
    ("e-notation-tiny-vs-zero", "1E-30", "0", False, EX),
    ("times-ten-negative", r"1.5\times10^{-3}", "0.0015", True, EX),
    ("times-ten-spaced", r"1.5 \times 10^{-3}", "0.00150", True, EX),
    ("cdot-ten-positive", r"6.02\cdot 10^{23}", "602000000000000000000000", True, EX),
    ("e-notation-ninth-digit", "6.02e23", "6.020000001e23", False, EX),
    ("negative-power-of-ten", "10^{-7}", "10^{-8}", False, EX),
    ("negative-power-of-two", "2^{-98}", "2^{-99}", False, EX),
    ("power-vs-fraction", "2^{-10}", r"\frac{1}{1024}", True, EX),
    ("power-of-ten-vs-integer", "10^{6}", "1000000", True, EX),
    # large integers, with and without separators
    ("separators-off-by-one", "1,000,000,001", "1000000000", False, EX),
    ("latex-separators", "123{,}456{,}789", "123456789.0", True, SM),
    ("thin-space-separators", r"1\,000\,001", "1000001", True, SM),
    ("negative-with-separators", "-1,000,000", "-1000000.00", True, SM),
    ("twenty-digits-off-by-one", "12345678901234567890", "12345678901234567891", False, EX),
    # percentages are compared by their number, exactly
    ("percent-exact", r"12.5\%", "12.50", True, SM),
    ("percent-eighth-digit", r"12.5000001\%", "12.5", False, EX),
    # numbers next to symbolic forms: math_verify decides, with exact numeric comparisons
    ("sqrt-vs-decimal", "0.7071068", r"\frac{\sqrt{2}}{2}", False, MV),
    ("pi-vs-decimal", "3.14159265358979", r"\pi", False, MV),
    ("tuple-decimal-vs-fraction", r"(0.3333333, 1)", r"(\frac{1}{3}, 1)", False, MV),
    ("tuple-exact-decimal", r"(0.25, 1)", r"(\frac{1}{4}, 1)", True, MV),
    ("sqrt-forms-still-equal", r"\frac{1}{\sqrt{2}}", r"\frac{\sqrt{2}}{2}", True, MV),
]


@pytest.mark.parametrize(
    ("answer", "reference", "correct", "decided_by"),
    [case[1:] for case in EXACT_CASES],
    ids=[case[0] for case in EXACT_CASES],
)
def test_numbers_are_compared_exactly(
    answer: str, reference: str, correct: bool, decided_by: str
) -> None:
    verdict = grade(rf"So the result is \boxed{{{answer}}}.", reference, timeout=10.0)
    assert (verdict.correct, verdict.decided_by) == (correct, decided_by)
    assert verdict.extracted == answer


@pytest.mark.parametrize(
    ("answer", "value"),
    [
        ("0.0000001", Fraction(1, 10**7)),
        (r"\frac{1}{2^{98}}", Fraction(1, 2**98)),
        (r"1.5\times10^{-3}", Fraction(3, 2000)),
        ("-1,000,000", Fraction(-(10**6))),
        (r"50\%", Fraction(50)),
        ("-3/4", Fraction(-3, 4)),
        ("1e3", Fraction(1000)),
        (r"\frac{0.5}{2}", Fraction(1, 4)),
        ("{7}", Fraction(7)),
        # not plain numbers: symbolic, ambiguous or out of bounds
        (r"\sqrt{2}", None),
        ("x+1", None),
        ("1,5", None),
        (r"\frac{1}{0}", None),
        ("0^{-1}", None),
        ("2^{100000}", None),
        ("1/2/3", None),
        (r"1\frac{1}{2}", None),
        ("", None),
    ],
)
def test_exact_number_values(answer: str, value: Fraction | None) -> None:
    assert exact_number(answer) == value


@pytest.mark.parametrize(
    ("output", "answer", "rule"),
    [
        (r"\boxed{\frac{a}{\sqrt{b^{2}}}}", r"\frac{a}{\sqrt{b^{2}}}", "boxed"),
        (r"\boxed{\{1,2\}}", r"\{1,2\}", "boxed"),
        (r"\boxed{\left\{ x \mid x > 0 \right.}", r"\left\{ x \mid x > 0 \right.", "boxed"),
        (r"\boxed   {  7 }", "7", "boxed"),
        (r"$\boxed 12$", "12", "boxed"),
        (r"\boxed{}", None, "none"),
        (r"\boxedfoo{3}", None, "none"),
        ("The answer is: $x = 5$ because", "x = 5", "fallback:answer_is"),
        ("The answer is \\boxed{8}.", "8", "boxed"),
        ("the final answer is **3.5**.", "3.5", "fallback:final_answer"),
        ("the answer is 3.5. Next we check.", "3.5", "fallback:answer_is"),
        ("", None, "none"),
    ],
)
def test_extract_answer_forms(output: str, answer: str | None, rule: str) -> None:
    assert extract_answer(output) == Extraction(answer, rule)


def test_fallback_patterns_are_configurable() -> None:
    text = "Result => 12"
    assert extract_answer(text) == Extraction(None, "none")
    custom = (FallbackPattern("arrow", r"result\s*=>"),)
    assert extract_answer(text, fallback_patterns=custom) == Extraction("12", "fallback:arrow")
    assert extract_answer("The answer is 4", fallback_patterns=None) == Extraction(None, "none")
    assert extract_answer("The answer is 4", fallback_patterns=()) == Extraction(None, "none")


@pytest.mark.parametrize(
    ("raw", "normalized"),
    [
        (r"$\dfrac12$", r"\frac{1}{2}"),
        (r"\left( 1, 2 \right)", "(1,2)"),
        (r"5\!\,\text{ cm}", "5"),
        ("5 cm", "5"),
        (r"45^{\circ}", "45"),
        (r"12.50\%", "12.5"),
        ("1,234,567", "1234567"),
        ("-0.0", "0"),
        (r"\boxed{7.}", "7"),
        (r"\pi r^2", r"\pi r^2"),
        ("No Solution", "no solution"),
        (r"\text{(C)}", "C"),
        ("[0,1)", "[0,1)"),
        ("(0,1)", "(0,1)"),
        (r"\varnothing", r"\emptyset"),
    ],
)
def test_normalize_answer(raw: str, normalized: str) -> None:
    assert normalize_answer(raw) == normalized


def test_grade_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="reference_answer is empty"):
        grade(r"\boxed{1}", "  $ $ ")
    with pytest.raises(ValueError, match="timeout"):
        grade(r"\boxed{1}", "2", timeout=0)


def test_verdict_and_extraction_are_json_serialisable() -> None:
    verdict = grade(r"\boxed{\frac{1}{2}}", "0.5")
    assert json.loads(json.dumps(verdict.to_dict())) == {
        "correct": True,
        "extracted": r"\frac{1}{2}",
        "extraction_rule": "boxed",
        "decided_by": "exact_number",
    }
    assert json.loads(json.dumps(Extraction(None, "none").to_dict())) == {
        "answer": None,
        "rule": "none",
    }


def test_importing_grading_pulls_in_neither_torch_nor_sympy() -> None:
    code = (
        "import sys, opsd_engine.grading as g\n"
        "assert g.extract_answer(r'\\boxed{1}').answer == '1'\n"
        "print(sorted(m for m in ('torch', 'sympy', 'math_verify') if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "[]"


# --------------------------------------------------------------------------------------------
# Time limits and threads
# --------------------------------------------------------------------------------------------


def test_call_with_timeout_returns_results_and_reraises_errors() -> None:
    assert call_with_timeout(math.factorial, 10, timeout=30.0) == 3628800
    with pytest.raises(ValueError, match="math domain error"):
        call_with_timeout(math.sqrt, -1.0, timeout=30.0)
    assert call_with_timeout(math.gcd, 12, 18, timeout=30.0) == 6  # helper survived the error


def test_call_with_timeout_gives_up_on_a_sleeping_function() -> None:
    call_with_timeout(abs, -1, timeout=30.0)  # make sure a helper is already running
    start = time.monotonic()
    with pytest.raises(GradingTimeout):
        call_with_timeout(time.sleep, 60, timeout=0.5)
    assert time.monotonic() - start < 30  # far below the 60 s call: the timeout cut it short
    assert call_with_timeout(abs, -2, timeout=30.0) == 2  # a fresh helper replaces the killed one


def test_pathological_expression_falls_back_within_the_bound() -> None:
    # sympy evaluates this tower in one C call that holds the GIL: a thread-based timeout could
    # never fire. The helper process is killed instead.
    is_correct(r"\boxed{1}", "2")  # warm a helper
    start = time.monotonic()
    verdict = grade(r"\boxed{9^{9^{9^{9}}}}", "5", timeout=1.0)
    elapsed = time.monotonic() - start
    assert verdict == Verdict(False, "9^{9^{9^{9}}}", "boxed", TO)
    assert elapsed < 30  # the tower never finishes on its own: the timeout ended it
    # A string-identical pathological answer never reaches math_verify.
    assert grade(r"\boxed{9^{9^{9^{9}}}}", "9^{9^{9^{9}}}", timeout=1.0).decided_by == SM


def test_grading_from_a_plain_thread_while_main_thread_stays_responsive() -> None:
    results: dict[str, Verdict] = {}

    def work() -> None:
        results["slow"] = grade(r"\boxed{9^{9^{9^{9}}}}", "5", timeout=1.0)
        results["ok"] = grade(r"\boxed{\frac{1}{\sqrt{2}}}", r"\frac{\sqrt{2}}{2}")

    thread = threading.Thread(target=work)
    start = time.monotonic()
    thread.start()
    ticks = 0
    while thread.is_alive() and time.monotonic() - start < 20:
        time.sleep(0.05)
        ticks += 1
    thread.join(timeout=20)
    assert not thread.is_alive()
    assert results["slow"].decided_by == TO
    assert results["ok"] == Verdict(True, r"\frac{1}{\sqrt{2}}", "boxed", MV)
    assert ticks >= 10  # the main thread kept running during the 1 s timeout


def test_grading_from_a_thread_pool_matches_the_table() -> None:
    cases = [case for case in GRADE_CASES if case[3]]  # strip_thinking=True rows
    with concurrent.futures.ThreadPoolExecutor(max_workers=6) as pool:
        verdicts = list(pool.map(lambda case: grade(case[1], case[2], timeout=10.0), cases))
    for case, verdict in zip(cases, verdicts, strict=True):
        assert verdict.correct is case[4], case[0]
        assert verdict.decided_by == case[7], case[0]


def test_private_pool_limits_memory_and_closes() -> None:
    with VerifierPool(max_workers=1, memory_limit_mb=1024) as pool:
        with pytest.raises(MemoryError):
            pool.call(bytearray, 2 * 1024**3, timeout=30.0)
        assert pool.call(len, "abc", timeout=30.0) == 3
    with pytest.raises(VerifierError, match="closed"):
        pool.call(len, "abc", timeout=30.0)


def test_pool_that_cannot_start_a_helper_says_so() -> None:
    # 40 MiB of address space is not enough to import sympy: startup fails cleanly.
    with (
        VerifierPool(max_workers=1, memory_limit_mb=40) as pool,
        pytest.raises(VerifierUnavailable),
    ):
        pool.call(abs, -1, timeout=5.0)


def test_pool_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="max_workers"):
        VerifierPool(max_workers=0)
    with pytest.raises(ValueError, match="timeout"):
        call_with_timeout(abs, -1, timeout=0)


# --------------------------------------------------------------------------------------------
# pass@k
# --------------------------------------------------------------------------------------------


def _brute_force_pass_at_k(n: int, c: int, k: int) -> Fraction:
    """Fraction of k-subsets of n samples (c correct) that contain a correct sample."""
    outcomes = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    hits = sum(any(outcomes[i] for i in subset) for subset in subsets)
    return Fraction(hits, len(subsets))


def test_pass_at_k_matches_brute_force_enumeration() -> None:
    checked = 0
    for n in range(1, 9):
        for c in range(n + 1):
            for k in range(1, n + 1):
                expected = _brute_force_pass_at_k(n, c, k)
                got = pass_at_k(n, c, k)
                assert got == pytest.approx(float(expected), abs=1e-12), (n, c, k)
                if n - c < k:
                    assert got == 1.0
                checked += 1
    assert checked == sum(n * (n + 1) for n in range(1, 9))


def test_pass_at_k_edge_cases_and_large_n() -> None:
    assert pass_at_k(1, 0, 1) == 0.0
    assert pass_at_k(1, 1, 1) == 1.0
    assert pass_at_k(16, 0, 16) == 0.0
    assert pass_at_k(16, 16, 1) == 1.0
    assert pass_at_k(16, 4, 1) == pytest.approx(0.25)
    assert pass_at_k(16, 1, 16) == 1.0
    for n, c, k in [(200, 3, 50), (1000, 1, 1), (1000, 999, 2), (500, 17, 100)]:
        exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
        assert pass_at_k(n, c, k) == pytest.approx(float(exact), rel=1e-12)


@pytest.mark.parametrize(
    ("n", "c", "k", "message"),
    [
        (4, 5, 1, "0 <= c <= n"),
        (4, -1, 1, "0 <= c <= n"),
        (4, 2, 0, "1 <= k <= n"),
        (4, 2, 5, "1 <= k <= n"),
        (0, 0, 1, "n must be >= 1"),
        (4.0, 2, 1, "n must be an integer"),
        (4, True, 1, "c must be an integer"),
    ],
)
def test_pass_at_k_validates(n: object, c: object, k: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        pass_at_k(n, c, k)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# avg@k, majority vote, summaries
# --------------------------------------------------------------------------------------------


def test_avg_at_k() -> None:
    assert avg_at_k([True, False, False, True]) == 0.5
    assert avg_at_k([False] * 16) == 0.0
    with pytest.raises(ValueError):
        avg_at_k([])


def test_majority_vote() -> None:
    assert majority_vote(["1/2", "0.5", "0.5", None], [True, False, False, False]) is False
    assert majority_vote(["a", "b", "b", "a"], [False, True, True, False]) is False  # tie: first
    assert majority_vote(["b", "a", "a", "b"], [True, False, False, True]) is True
    # normalization groups \dfrac12 with \frac{1}{2} (2 votes) against 0.5 (1 vote)
    assert majority_vote([r"0.5", r"\frac{1}{2}", r"\dfrac12"], [False, True, True]) is True
    assert majority_vote([None, None], [False, False]) is False
    assert majority_vote(["4", None, None], [True, False, False]) is True  # None does not vote
    with pytest.raises(ValueError, match="same length"):
        majority_vote(["1"], [True, False])


def test_summarize_hand_computed() -> None:
    per_problem = [
        [True, False, False, False],
        [True, True, True, True],
        [False, False, False, False],
    ]
    answers = [
        ["1/2", "0.5", "0.5", None],
        ["4", "4", "4.0", "4"],
        ["7", "8", None, None],
    ]
    summary = summarize(per_problem, answers)
    assert (summary.n_problems, summary.n_samples, summary.total_samples) == (3, 4, 12)
    assert summary.avg_at_n == pytest.approx((0.25 + 1 + 0) / 3)
    assert summary.pass_at_k == pytest.approx(
        {1: (0.25 + 1) / 3, 2: (0.5 + 1) / 3, 3: (0.75 + 1) / 3, 4: 2 / 3}
    )
    assert summary.pass_at_k[1] == pytest.approx(summary.avg_at_n)
    assert summary.majority_vote == pytest.approx(1 / 3)
    first = summary.problems[0]
    assert (first.index, first.n, first.c, first.avg) == (0, 4, 1, 0.25)
    assert first.pass_at_k == pytest.approx({1: 0.25, 2: 0.5, 3: 0.75, 4: 1.0})
    assert [p.majority_correct for p in summary.problems] == [False, True, False]

    payload = json.loads(json.dumps(summary.to_dict()))
    assert payload["pass_at_k"]["4"] == pytest.approx(2 / 3)
    assert payload["problems"][1]["pass_at_k"]["1"] == 1.0
    assert payload["majority_vote"] == pytest.approx(1 / 3)

    plain = summarize(per_problem)
    assert plain.majority_vote is None
    assert plain.problems[0].majority_correct is None


def test_summarize_validates_shapes() -> None:
    with pytest.raises(ValueError, match="same number of samples"):
        summarize([[True, False], [True]])
    with pytest.raises(ValueError, match="at least one problem"):
        summarize([])
    with pytest.raises(ValueError, match="at least one sample"):
        summarize([[], []])
    with pytest.raises(ValueError, match="answers has 1 problems"):
        summarize([[True], [False]], [["1"]])
    with pytest.raises(ValueError, match="problem 1: 2 answers for 1 samples"):
        summarize([[True], [False]], [["1"], ["2", "3"]])
