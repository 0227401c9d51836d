"""Tiny offline Qwen3-architecture fixtures: tokenizer, random model and toy arithmetic dataset.

This module owns everything the engine's tests (and local smoke runs) need to exercise the
real ``transformers``/``peft`` code paths without any model hub access:

* :func:`build_tiny_tokenizer` trains a byte-level BPE (``tokenizers`` library) on a fixed,
  built-in corpus and wraps it as a ``PreTrainedTokenizerFast`` with Qwen3's special tokens,
  left padding and a Qwen3-style chat template (``enable_thinking`` included). Byte-level, no
  normalizer, so any unicode text round-trips through encode/decode.
* :func:`build_tiny_model` writes a randomly initialised ``Qwen3ForCausalLM`` (safetensors),
  the tokenizer and a generation config into a directory with ``save_pretrained``, so
  ``AutoModelForCausalLM.from_pretrained`` / ``AutoTokenizer.from_pretrained`` load it offline.
  Weights are bit-identical for a seed, and the default ``initializer_range`` is large enough
  that next-token distributions are peaked and context dependent (not near uniform).
* :func:`tiny_examples` / :func:`write_tiny_dataset` produce small multi-step arithmetic word
  problems with worked solutions ending in ``\\boxed{N}`` and a separate ``answer`` field.

Everything is deterministic for a seed; nothing touches the network.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Final

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

__all__ = [
    "BOXED_INSTRUCTION",
    "CHAT_TEMPLATE",
    "ENDOFTEXT",
    "IM_END",
    "IM_START",
    "THINK_END",
    "THINK_START",
    "TINY_VOCAB_SIZE",
    "build_tiny_model",
    "build_tiny_tokenizer",
    "tiny_examples",
    "write_tiny_dataset",
]

ENDOFTEXT: Final = "<|endoftext|>"
IM_START: Final = "<|im_start|>"
IM_END: Final = "<|im_end|>"
THINK_START: Final = "<think>"
THINK_END: Final = "</think>"

#: Total tokenizer length (trained BPE vocab + the five added tokens); a multiple of 64.
TINY_VOCAB_SIZE: Final = 512

#: The instruction Qwen-style math prompts append to a problem.
BOXED_INSTRUCTION: Final = "Please reason step by step, and put your final answer within \\boxed{}."

# Qwen2/Qwen3 pre-tokenisation regex: digits are split one by one, which suits arithmetic.
_PRETOKENIZE_REGEX: Final = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Qwen3's chat template, minus tool calling: system/user/assistant turns, ``reasoning_content``
# (or an inline ``<think>...</think>``) shown only for assistant turns after the last user
# query, and ``enable_thinking=False`` pre-filling an empty think block in the generation prompt.
CHAT_TEMPLATE: Final = r"""{%- if messages[0].role == 'system' %}
    {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
{%- endif %}
{%- set ns = namespace(last_query_index=messages|length - 1) %}
{%- for message in messages %}
    {%- if message.role == 'user' %}
        {%- set ns.last_query_index = loop.index0 %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if (message.role == 'user') or (message.role == 'system' and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>' + '\n' }}
    {%- elif message.role == 'assistant' %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- elif '</think>' in content %}
            {%- set reasoning_content = content.split('</think>')[0].rstrip('\n') %}
            {%- set reasoning_content = reasoning_content.split('<think>')[-1].lstrip('\n') %}
            {%- set content = content.split('</think>')[-1].lstrip('\n') %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index and (loop.last or reasoning_content) %}
            {{- '<|im_start|>assistant\n<think>\n' + reasoning_content.strip('\n') }}
            {{- '\n</think>\n\n' + content.lstrip('\n') }}
        {%- else %}
            {{- '<|im_start|>assistant\n' + content }}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- endif %}
{%- endif %}"""

_NAMES: Final = ("Tom", "Ana", "Sam", "Mia", "Leo", "Eva", "Ben", "Zoe", "Max", "Ivy")
_ITEMS: Final = ("apples", "books", "coins", "pens", "cards", "eggs", "shells", "stamps")
# Verb phrases for the steps after the opening amount.
_ADD_PHRASES: Final = ("buys {k} more", "finds {k} more", "gets {k} more")
_SUB_PHRASES: Final = ("gives away {k}", "loses {k}", "sells {k}")
_DOUBLE_PHRASE: Final = "doubles them"

_EXTRA_CORPUS: Final = (
    "You are a helpful assistant.",
    "You are a helpful assistant. Solve the problem.",
    BOXED_INSTRUCTION,
    "Problem:",
    "Solution:",
    "Answer:",
    "Here is a reference solution to this problem:",
    "After reading the reference solution above, solve the problem yourself.",
    "Reference solution:",
    "The correct answer is",
    "Let's think step by step.",
    "Let me think about this step by step.",
    "First, second, then, finally, so the answer is",
    "Wait, let me check the steps again. Yes, that is right.",
    "The quick brown fox jumps over the lazy dog. A small model reads short text.",
    "We add, subtract, multiply and divide numbers to get the total.",
    "0 1 2 3 4 5 6 7 8 9 10 11 12 20 50 100 1000",
    "+ - * / = < > ( ) [ ] { } . , : ; ? ! % ^ _ $ # & | ~ ' \" \\",
    "1 + 1 = 2. 9 - 4 = 5. 3 * 4 = 12. 8 / 2 = 4. 2^3 = 8. (2 + 3) * 4 = 20.",
    "$x + y = 10$, $x^2 + y^2$, \\frac{1}{2}, \\sqrt{4} = 2, 3 \\times 4 = 12, a \\cdot b",
    "\\boxed{}, \\boxed{0}, \\boxed{42}, \\text{apples}, \\left( x \\right), \\le, \\ge",
    "system\nuser\nassistant\n\n",
    # Basic English, so ordinary words get merges too.
    "The student reads the question, writes down what is known and what is asked, and then "
    "works through the problem one step at a time. Each step should be short and easy to "
    "check. When the work is done, the student checks the result against the question.",
    "There are many ways to solve a problem. Some people like to draw a picture, others like "
    "to write an equation. It is important to understand why a method works, not only how "
    "to use it. Practice makes the steps feel natural.",
    "In the morning she walked to the market with her friends. They bought fresh bread, some "
    "fruit and a bottle of water, and they talked about the weather and their plans for the "
    "week. In the evening they cooked dinner together and shared the food with everyone.",
    "This is a test. That was a good answer. What is the total number? Which one is larger? "
    "How much is left? Why does this work? Because the numbers add up.",
    # LaTeX.
    "Let $n$ be a positive integer. Then $\\sum_{k=1}^{n} k = \\frac{n(n+1)}{2}$, and "
    "therefore $\\sum_{k=1}^{10} k = 55$. If $a = 3$ and $b = 4$, then $a^2 + b^2 = 25$ "
    "so $\\sqrt{a^2 + b^2} = 5$.",
    "\\begin{align} x + 2 &= 5 \\\\ x &= 3 \\end{align} "
    "\\int_0^1 x \\, dx = \\frac{1}{2}, \\quad \\pi \\approx 3.14, \\quad "
    "\\alpha + \\beta = \\gamma, \\quad f(x) = \\lim_{h \\to 0} \\frac{f(x+h) - f(x)}{h}",
)


# ---------------------------------------------------------------------------------------------
# Dataset
# ---------------------------------------------------------------------------------------------


def _one_example(rng: random.Random) -> dict[str, str]:
    name = rng.choice(_NAMES)
    item = rng.choice(_ITEMS)
    total = rng.randint(2, 9)
    n_steps = rng.randint(2, 3)
    clauses: list[str] = []
    equations: list[str] = []
    doubled = False
    for _ in range(n_steps):
        kinds = ["add", "sub"] if (doubled or total > 9) else ["add", "sub", "double"]
        kind = rng.choice(kinds) if total > 1 else "add"
        if kind == "add":
            k = rng.randint(1, 9)
            clauses.append(rng.choice(_ADD_PHRASES).format(k=k))
            equations.append(f"{total} + {k} = {total + k}.")
            total += k
        elif kind == "sub":
            k = rng.randint(1, total - 1)
            clauses.append(rng.choice(_SUB_PHRASES).format(k=k))
            equations.append(f"{total} - {k} = {total - k}.")
            total -= k
        else:
            doubled = True
            clauses.append(_DOUBLE_PHRASE)
            equations.append(f"{total} * 2 = {total * 2}.")
            total *= 2
    start = equations[0].split(" ", 1)[0]
    actions = ", then ".join(clauses[1:])
    problem = (
        f"{name} has {start} {item} and {clauses[0]}, then {actions}. "
        f"How many {item} does {name} have?"
    )
    solution = " ".join(equations) + f" The answer is \\boxed{{{total}}}."
    return {"problem": problem, "solution": solution, "answer": str(total)}


def tiny_examples(n: int = 64, *, seed: int = 0) -> list[dict[str, str]]:
    """``n`` distinct arithmetic word problems with ``problem``, ``solution`` and ``answer``.

    Each problem has 2-3 steps (add / subtract / double) on numbers below 40; the solution
    writes one equation per step and ends with ``The answer is \\boxed{N}.`` where
    ``answer == str(N)``. Deterministic for ``seed``.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(seed)
    rows: list[dict[str, str]] = []
    seen: set[str] = set()
    attempts = 0
    while len(rows) < n:
        row = _one_example(rng)
        attempts += 1
        # Distinct problems while possible; fall back to repeats for very large n.
        if row["problem"] in seen and attempts < 50 * (n + 1):
            continue
        seen.add(row["problem"])
        rows.append(row)
    return rows


def write_tiny_dataset(path: str | Path, *, n: int = 64, seed: int = 0) -> Path:
    """Write :func:`tiny_examples` as JSONL (one object per line) to ``path``; returns it."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(row, ensure_ascii=False) for row in tiny_examples(n, seed=seed)]
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------


def _tokenizer_corpus() -> list[str]:
    # Chat-shaped text (role names, the boxed instruction, problem, solution) as the tokenizer
    # will see it between special tokens, which are added after training.
    # Also OPSD-style student/teacher prompt text ("Problem: ...", a reference solution).
    corpus = list(_EXTRA_CORPUS)
    for seed in range(4):
        for i, row in enumerate(tiny_examples(128, seed=seed)):
            if i % 2:
                user = f"{row['problem']} {BOXED_INSTRUCTION}"
            elif i % 4:
                user = f"Problem: {row['problem']}\nAnswer:"
            else:
                user = (
                    f"Problem: {row['problem']}\nHere is a reference solution:\n"
                    f"{row['solution']}\nAfter understanding the reference solution, please "
                    "try to solve this problem using your own approach below:\nAnswer:"
                )
            corpus.append(
                f"system\nYou are a helpful assistant.\nuser\n{user}\n"
                f"assistant\n\n\n{row['solution']}\n"
            )
    return corpus


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with Qwen3's special tokens and chat template.

    Trained deterministically on a fixed built-in corpus (toy dataset text, prompt phrases,
    digits/arithmetic symbols, basic English and LaTeX). ``len(tokenizer) == TINY_VOCAB_SIZE``:
    ids ``0..506`` are the byte alphabet plus merges, then ``<|endoftext|>`` (pad),
    ``<|im_start|>``, ``<|im_end|>`` (eos), ``<think>``, ``</think>`` as in Qwen3 (where, too,
    the think tags are added but not "special", so ``skip_special_tokens`` keeps them).
    """
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    added = [
        AddedToken(ENDOFTEXT, special=True, normalized=False),
        AddedToken(IM_START, special=True, normalized=False),
        AddedToken(IM_END, special=True, normalized=False),
        AddedToken(THINK_START, special=False, normalized=False),
        AddedToken(THINK_END, special=False, normalized=False),
    ]
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB_SIZE - len(added),
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    backend.train_from_iterator(_tokenizer_corpus(), trainer=trainer)
    backend.add_tokens(added)
    if backend.get_vocab_size(with_added_tokens=True) != TINY_VOCAB_SIZE:
        raise RuntimeError(
            f"tiny tokenizer has {backend.get_vocab_size(with_added_tokens=True)} tokens, "
            f"expected {TINY_VOCAB_SIZE}; the built-in corpus is too small for the merges"
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        bos_token=None,
        unk_token=None,
        extra_special_tokens=[IM_START, IM_END],
        padding_side="left",
        model_max_length=4096,
        clean_up_tokenization_spaces=False,
        chat_template=CHAT_TEMPLATE,
    )


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------


def build_tiny_model(
    out_dir: str | Path,
    *,
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 2,
    tie_word_embeddings: bool = True,
    initializer_range: float = 0.2,
) -> Path:
    """Write a random tiny ``Qwen3ForCausalLM`` + tokenizer + generation config to ``out_dir``.

    Shape for the defaults: hidden 64, 2 layers, 4 query heads / 2 kv heads of dim 16,
    intermediate 128, 4096 positions, vocab ``TINY_VOCAB_SIZE`` (tokenizer length rounded up
    to a multiple of 64), float32 safetensors. ``hidden_size`` must be a multiple of 16
    (head_dim stays 16; heads = hidden / 16, kv heads = half of that). Weights are
    bit-identical for a ``seed``. ``initializer_range`` 0.2 (vs. 0.02 for real checkpoints)
    gives peaked, context-dependent next-token distributions. Returns ``Path(out_dir)``.
    """
    head_dim = 16
    if hidden_size <= 0 or hidden_size % head_dim:
        raise ValueError(
            f"hidden_size must be a positive multiple of {head_dim}, got {hidden_size}"
        )
    if num_layers <= 0:
        raise ValueError(f"num_layers must be positive, got {num_layers}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    tokenizer = build_tiny_tokenizer()
    endoftext_id = tokenizer.convert_tokens_to_ids(ENDOFTEXT)
    im_end_id = tokenizer.convert_tokens_to_ids(IM_END)
    num_heads = hidden_size // head_dim
    config = Qwen3Config(
        vocab_size=-(-len(tokenizer) // 64) * 64,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=max(1, num_heads // 2),
        head_dim=head_dim,
        hidden_act="silu",
        max_position_embeddings=4096,
        initializer_range=initializer_range,
        rms_norm_eps=1e-6,
        tie_word_embeddings=tie_word_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
        bos_token_id=endoftext_id,
        eos_token_id=im_end_id,
        pad_token_id=endoftext_id,
        dtype="float32",
    )
    # Seed a forked RNG so the weights depend only on ``seed`` and the caller's RNG is untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen3ForCausalLM(config).to(torch.float32)
    model.generation_config = GenerationConfig(
        bos_token_id=endoftext_id,
        eos_token_id=[im_end_id, endoftext_id],
        pad_token_id=endoftext_id,
    )
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    from opsd_engine.checkpoint import normalize_modes

    normalize_modes(out)  # safetensors leaves model.safetensors 0600
    return out
