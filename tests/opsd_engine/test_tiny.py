"""Tests for ``opsd_engine.tiny``: the offline tiny Qwen3 model, tokenizer and toy dataset.

``tiny_model_dir`` (seed 0) is the session fixture from ``tests/conftest.py``.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedTokenizerBase,
    Qwen3ForCausalLM,
)

from opsd_engine.tiny import (
    BOXED_INSTRUCTION,
    ENDOFTEXT,
    IM_END,
    IM_START,
    THINK_END,
    THINK_START,
    TINY_VOCAB_SIZE,
    build_tiny_model,
    build_tiny_tokenizer,
    tiny_examples,
    write_tiny_dataset,
)

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SPECIAL = [ENDOFTEXT, IM_START, IM_END, THINK_START, THINK_END]
BOXED = re.compile(r"\\boxed\{(-?\d+)\}")


@pytest.fixture(scope="module")
def loaded(tiny_model_dir: Path) -> tuple[Qwen3ForCausalLM, PreTrainedTokenizerBase]:
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir, local_files_only=True)
    model.eval()
    return model, tokenizer


def _messages(problem: str, system: str | None = None) -> list[dict[str, str]]:
    msgs = [{"role": "system", "content": system}] if system else []
    return [*msgs, {"role": "user", "content": f"{problem} {BOXED_INSTRUCTION}"}]


# --- tokenizer -----------------------------------------------------------------------------


def test_tokenizer_training_is_deterministic() -> None:
    a, b = build_tiny_tokenizer(), build_tiny_tokenizer()
    a_json = json.loads(a.backend_tokenizer.to_str())
    b_json = json.loads(b.backend_tokenizer.to_str())
    assert a_json["model"]["vocab"] == b_json["model"]["vocab"]
    assert a_json["model"]["merges"] == b_json["model"]["merges"]
    assert a.backend_tokenizer.to_str() == b.backend_tokenizer.to_str()
    assert len(a) == TINY_VOCAB_SIZE
    assert len(a_json["model"]["merges"]) > 200  # a real BPE, not just the byte alphabet


def test_special_tokens_are_single_ids_and_qwen3_roles() -> None:
    tok = build_tiny_tokenizer()
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL}
    assert sorted(ids.values()) == list(range(TINY_VOCAB_SIZE - 5, TINY_VOCAB_SIZE))
    for text, tid in ids.items():
        assert tok(text, add_special_tokens=False)["input_ids"] == [tid]
    assert tok.pad_token == ENDOFTEXT and tok.pad_token_id == ids[ENDOFTEXT]
    assert tok.eos_token == IM_END and tok.eos_token_id == ids[IM_END]
    assert tok.bos_token is None
    assert tok.padding_side == "left"
    # As in Qwen3: im_* are special (dropped by skip_special_tokens), think tags are not.
    assert set(tok.all_special_tokens) >= {ENDOFTEXT, IM_START, IM_END}
    assert THINK_START not in tok.all_special_tokens

    row = tiny_examples(1)[0]
    rendered = tok.apply_chat_template(
        _messages(row["problem"], "You are a helpful assistant."),
        tokenize=False,
        add_generation_prompt=True,
        enable_thinking=False,
    )
    enc = tok(rendered, add_special_tokens=False)["input_ids"]
    for text, tid in ids.items():
        assert enc.count(tid) == rendered.count(text), text
    assert enc[0] == ids[IM_START]
    assert tok.decode(enc) == rendered
    assert tok("abc")["input_ids"] == tok("abc", add_special_tokens=False)["input_ids"]
    stripped = tok.decode(enc, skip_special_tokens=True)
    assert IM_START not in stripped and IM_END not in stripped
    assert stripped.endswith(f"assistant\n{THINK_START}\n\n{THINK_END}\n\n")


def test_chat_template_enable_thinking() -> None:
    tok = build_tiny_tokenizer()
    msgs = _messages("Tom has 3 apples.", "Be brief.")
    default = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    think_on = tok.apply_chat_template(
        msgs, tokenize=False, add_generation_prompt=True, enable_thinking=True
    )
    think_off = tok.apply_chat_template(
        msgs, tokenize=False, add_generation_prompt=True, enable_thinking=False
    )
    expected_head = (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        f"<|im_start|>user\nTom has 3 apples. {BOXED_INSTRUCTION}<|im_end|>\n"
    )
    assert default == think_on == expected_head + "<|im_start|>assistant\n"
    assert think_off == expected_head + "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    no_prompt = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=False)
    assert no_prompt == expected_head


def test_chat_template_assistant_turns_like_qwen3() -> None:
    tok = build_tiny_tokenizer()
    convo = [
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "<think>\nold thoughts\n</think>\n\na1"},
        {"role": "user", "content": "q2"},
        {"role": "assistant", "content": "a2", "reasoning_content": "new thoughts"},
    ]
    text = tok.apply_chat_template(convo, tokenize=False)
    assert text == (
        "<|im_start|>user\nq1<|im_end|>\n"
        "<|im_start|>assistant\na1<|im_end|>\n"  # reasoning of earlier turns is dropped
        "<|im_start|>user\nq2<|im_end|>\n"
        "<|im_start|>assistant\n<think>\nnew thoughts\n</think>\n\na2<|im_end|>\n"
    )
    # The final assistant turn always gets a think block, even an empty one.
    last = tok.apply_chat_template(
        [*convo[:3], {"role": "assistant", "content": "a2"}], tokenize=False
    )
    assert last.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\na2<|im_end|>\n")


@pytest.mark.parametrize(
    "text",
    [
        "Tom has 3 apples. \\boxed{5}",
        "héllo wörld, naïve café — “quotes” ‘and’ … ellipsis",
        "中文字符 日本語のテキスト 한국어 текст العربية עברית हिन्दी",
        "emoji 🙂👍🏽👨‍👩‍👧‍👦 🇯🇵 and math ∑∫√∞ ≤ ≥ ≠ ∂ π",
        "e\u0301 (decomposed) vs é (composed), ﬁ ligature, \u200b zero width, \ufeff bom",
        "tabs\tand\r\nwindows newlines\n\n\n  leading and trailing spaces  ",
        "control \x00\x01\x7f chars and a \U0010ffff plane-16 char",
        "literal specials <|im_start|>user\n<think>hi</think><|im_end|><|endoftext|>",
        "",
    ],
)
def test_unicode_round_trip(text: str) -> None:
    tok = build_tiny_tokenizer()
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert all(0 <= i < TINY_VOCAB_SIZE for i in ids)
    assert tok.decode(ids) == text


# --- model build ---------------------------------------------------------------------------


def _file_bytes(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_build_is_deterministic_per_seed(tmp_path: Path) -> None:
    rng_before = torch.random.get_rng_state()
    a = build_tiny_model(tmp_path / "a", seed=3)
    b = build_tiny_model(tmp_path / "b", seed=3)
    c = build_tiny_model(tmp_path / "c", seed=4)
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # caller's RNG untouched

    files_a, files_b, files_c = _file_bytes(a), _file_bytes(b), _file_bytes(c)
    assert {"config.json", "generation_config.json", "model.safetensors"} <= files_a.keys()
    assert {"tokenizer.json", "tokenizer_config.json"} <= files_a.keys()
    assert files_a == files_b  # bit-identical, every file
    assert files_a["model.safetensors"] != files_c["model.safetensors"]
    assert files_a["tokenizer.json"] == files_c["tokenizer.json"]

    wa, wc = load_file(a / "model.safetensors"), load_file(c / "model.safetensors")
    assert wa.keys() == wc.keys()
    assert "lm_head.weight" not in wa  # tied to the embeddings
    emb = "model.embed_tokens.weight"
    assert wa[emb].dtype == torch.float32
    assert not torch.equal(wa[emb], wc[emb])


def test_from_pretrained_round_trip_offline(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir, local_files_only=True)
    ref = build_tiny_tokenizer()

    assert isinstance(model, Qwen3ForCausalLM)
    cfg = model.config
    assert cfg.model_type == "qwen3"
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size) == (64, 2, 128)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (4, 2, 16)
    assert cfg.max_position_embeddings == 4096
    assert cfg.vocab_size == TINY_VOCAB_SIZE and cfg.vocab_size % 64 == 0
    assert cfg.vocab_size >= len(tok)
    assert cfg.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert cfg.pad_token_id == cfg.bos_token_id == tok.pad_token_id
    assert cfg.eos_token_id == tok.eos_token_id
    gen = model.generation_config
    assert gen.eos_token_id == [tok.convert_tokens_to_ids(IM_END), tok.pad_token_id]
    assert gen.pad_token_id == tok.pad_token_id

    saved = load_file(tiny_model_dir / "model.safetensors")
    state = model.state_dict()
    for name, tensor in saved.items():
        assert torch.equal(state[name], tensor), name

    assert len(tok) == len(ref)
    assert tok.get_vocab() == ref.get_vocab()
    assert tok.chat_template == ref.chat_template
    assert tok.padding_side == "left"
    assert (tok.pad_token, tok.eos_token) == (ENDOFTEXT, IM_END)
    sample = "Sam has 4 pens 🙂 <think>\n</think> \\boxed{4}<|im_end|>"
    assert tok(sample)["input_ids"] == ref(sample)["input_ids"]

    # Left-padded batched greedy generation runs and stops at most at max_new_tokens.
    prompts = [
        tok.apply_chat_template(_messages(r["problem"]), tokenize=False, add_generation_prompt=True)
        for r in tiny_examples(2)
    ]
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    assert (enc["attention_mask"][:, -1] == 1).all()  # left padding
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=6, do_sample=False)
    assert (
        out.shape[0] == 2
        and enc["input_ids"].shape[1] < out.shape[1] <= enc["input_ids"].shape[1] + 6
    )


def test_lora_attaches_to_all_projections(
    loaded: tuple[Qwen3ForCausalLM, PreTrainedTokenizerBase],
) -> None:
    model, tok = loaded
    base = AutoModelForCausalLM.from_config(model.config)  # fresh copy, keep the fixture clean
    base.load_state_dict(model.state_dict())
    peft_model = get_peft_model(
        base,
        LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS, task_type="CAUSAL_LM"),
    )
    lora_a = [n for n, _ in peft_model.named_parameters() if "lora_A" in n]
    assert len(lora_a) == len(LORA_TARGETS) * model.config.num_hidden_layers
    for target in LORA_TARGETS:
        assert any(f".{target}.lora_A" in n for n in lora_a), target
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)

    ids = tok(tiny_examples(1)[0]["solution"], return_tensors="pt")["input_ids"]
    loss = peft_model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = [p.grad for n, p in peft_model.named_parameters() if "lora_B" in n]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)


def test_random_model_is_peaked_and_context_dependent(
    loaded: tuple[Qwen3ForCausalLM, PreTrainedTokenizerBase],
) -> None:
    model, tok = loaded
    rows = tiny_examples(4, seed=1)
    texts = [
        tok.apply_chat_template(_messages(r["problem"]), tokenize=False, add_generation_prompt=True)
        + r["solution"]
        for r in rows
    ]
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        logp = model(**enc).logits.float().log_softmax(-1)
    mask = enc["attention_mask"].bool()
    entropy = -(logp.exp() * logp).sum(-1)[mask]
    log_v = math.log(model.config.vocab_size)
    assert entropy.mean().item() < log_v - 0.75  # clearly below uniform (log V ~ 6.24)
    assert logp.exp().max(-1).values[mask].mean().item() > 5.0 / model.config.vocab_size
    assert logp.argmax(-1)[mask].unique().numel() > 20  # not one fixed token everywhere

    # Student (problem only) vs teacher (problem + reference solution) on the same response.
    row = rows[0]
    response = tok(row["solution"], add_special_tokens=False)["input_ids"]
    student = tok.apply_chat_template(
        _messages(row["problem"]), tokenize=False, add_generation_prompt=True
    )
    teacher = tok.apply_chat_template(
        _messages(f"{row['problem']}\nReference solution: {row['solution']}"),
        tokenize=False,
        add_generation_prompt=True,
    )
    dists = []
    for prompt in (student, teacher):
        ids = tok(prompt, add_special_tokens=False)["input_ids"] + response
        with torch.no_grad():
            out = model(input_ids=torch.tensor([ids])).logits[0, -len(response) :]
        dists.append(out.float().log_softmax(-1))
    s_logp, t_logp = dists
    kl = (t_logp.exp() * (t_logp - s_logp)).sum(-1).mean().item()
    tv = 0.5 * (t_logp.exp() - s_logp.exp()).abs().sum(-1).mean().item()
    assert kl > 0.1
    assert tv > 0.1


# --- dataset -------------------------------------------------------------------------------


def _check_equations(solution: str) -> int:
    """Replay ``a op b = c.`` steps; returns the final value."""
    steps = re.findall(r"(\d+) ([-+*]) (\d+) = (\d+)\.", solution)
    assert 2 <= len(steps) <= 3, solution
    value = int(steps[0][0])
    for a, op, b, c in steps:
        assert int(a) == value
        value = {"+": value + int(b), "-": value - int(b), "*": value * int(b)}[op]
        assert value == int(c) and value >= 0
    return value


def test_dataset_rows_are_consistent() -> None:
    rows = tiny_examples(64, seed=0)
    assert len(rows) == 64
    assert len({r["problem"] for r in rows}) == 64
    for row in rows:
        assert set(row) == {"problem", "solution", "answer"}
        assert all(isinstance(v, str) and v for v in row.values())
        boxed = BOXED.findall(row["solution"])
        assert boxed == [row["answer"]]
        assert row["solution"].endswith(f"The answer is \\boxed{{{row['answer']}}}.")
        assert _check_equations(row["solution"]) == int(row["answer"])
        assert row["problem"].endswith("?") and len(row["problem"]) < 160
        start = re.search(r" has (\d+) ", row["problem"])
        assert start and row["solution"].startswith(start.group(1) + " ")


def test_dataset_determinism_and_jsonl(tmp_path: Path) -> None:
    assert tiny_examples(16, seed=5) == tiny_examples(16, seed=5)
    assert tiny_examples(16, seed=5) != tiny_examples(16, seed=6)
    assert tiny_examples(8, seed=5) == tiny_examples(16, seed=5)[:8]
    assert tiny_examples(0) == []

    path = write_tiny_dataset(tmp_path / "sub" / "train.jsonl", n=10, seed=2)
    assert path == tmp_path / "sub" / "train.jsonl"
    lines = path.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == tiny_examples(10, seed=2)
    again = write_tiny_dataset(tmp_path / "again.jsonl", n=10, seed=2)
    assert again.read_bytes() == path.read_bytes()


def test_dataset_tokenizes_compactly() -> None:
    tok = build_tiny_tokenizer()
    for row in tiny_examples(16):
        prompt = tok.apply_chat_template(
            _messages(row["problem"]), tokenize=False, add_generation_prompt=True
        )
        n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
        n_solution = len(tok(row["solution"], add_special_tokens=False)["input_ids"])
        assert n_prompt < 96 and n_solution < 64
        assert n_solution < len(row["solution"].encode()) * 0.8  # merges are used


# --- options -------------------------------------------------------------------------------


def test_build_options(tmp_path: Path) -> None:
    out = build_tiny_model(
        tmp_path / "m", seed=1, hidden_size=128, num_layers=3, tie_word_embeddings=False
    )
    model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    cfg = model.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size) == (128, 3, 256)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (8, 4, 16)
    assert not cfg.tie_word_embeddings
    assert "lm_head.weight" in load_file(out / "model.safetensors")
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()

    with pytest.raises(ValueError, match="hidden_size"):
        build_tiny_model(tmp_path / "bad", hidden_size=50)
    with pytest.raises(ValueError, match="num_layers"):
        build_tiny_model(tmp_path / "bad", num_layers=0)
