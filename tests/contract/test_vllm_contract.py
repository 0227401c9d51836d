"""vLLM's OpenAI-server semantics for what OPSD uses, as a contract: run against
`opsd serve-adapters` in CI and, unchanged, against a real vLLM (see ``conftest.py``).

Each expectation cites the vLLM source it comes from (vllm-project/vllm, ``main`` as read for
issue #10; paths and functions given so they can be found in any recent release):

[SP-eos]     vllm/sampling_params.py, ``SamplingParams.update_from_generation_config``: the
             tokenizer's EOS becomes ``_eos_token_id``; the generation config's other
             ``eos_token_id`` values are added to ``stop_token_ids``.
[SP-greedy]  vllm/sampling_params.py, ``_verify_greedy_sampling``: "n must be 1 when using
             greedy sampling"; ``__post_init__``: a seed of -1 is no seed.
[STOP]       vllm/v1/core/sched/utils.py, ``check_stop``: a request stops when its last token
             is ``eos_token_id`` (stop_reason stays None) or is in ``stop_token_ids``
             (``request.stop_reason = last_token_id``), else at ``max_tokens`` (length).
[DETOK]      vllm/v1/engine/detokenizer.py, ``BaseIncrementalDetokenizer.update``: a request
             ended by a stop token leaves that token out of the text unless
             ``include_stop_str_in_output``; then ``check_stop_strings`` searches the new text
             for each stop string (list order) and truncates the text before it (after it with
             ``include_stop_str_in_output``); vllm/v1/engine/output_processor.py turns the match
             into ``finish_reason="stop"``, ``stop_reason=<string>`` and aborts the request, so
             the token ids end at the token that completed the string.
[PROTO]      vllm/entrypoints/openai/completion/protocol.py, ``CompletionRequest``: fields
             ``stop_token_ids``, ``include_stop_str_in_output``, ``skip_special_tokens``
             (default true), ``return_token_ids``; usage counts the returned token ids.
[LORA]       vllm/lora/peft_helper.py, ``PEFTHelper.validate_legal``: ``max_rank = max([self.r,
             *self.rank_pattern.values()])``, refused when above ``max_lora_rank`` ("LoRA rank
             R is greater than max_lora_rank M."); ``_validate_features`` refuses DoRA,
             ``bias != "none"`` ("Adapter bias is not supported."); the OpenAI server answers
             a failed ``/v1/load_lora_adapter`` with 400 (serving_models.py).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from tests.contract.conftest import Served

MAX_TOKENS = 48
PROBLEMS = 12


def chat_prompts(served: Served) -> list[list[int]]:
    """Student-style chat prompts for tiny arithmetic problems, thinking off and default."""
    from opsd_engine.tiny import tiny_examples

    tokenizer = served.tokenizer
    prompts = []
    for row in tiny_examples(PROBLEMS, seed=3):
        messages = [{"role": "user", "content": f"Problem: {row['problem']}\nAnswer:"}]
        for kwargs in ({"enable_thinking": False}, {}):
            text = tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True, **kwargs
            )
            prompts.append(list(tokenizer(text, add_special_tokens=False)["input_ids"]))
    return prompts


def check_choice(choice: dict[str, Any], stop_set: set[int], primary_eos: int | None) -> None:
    """[STOP]: no stop-set token before the last; the stop reason of a token stop."""
    ids = choice["token_ids"]
    assert not set(ids[:-1]) & stop_set, "generation ran past a token of its stop set"
    if choice["finish_reason"] == "stop" and ids[-1] in stop_set:
        assert choice["stop_reason"] == (None if ids[-1] == primary_eos else ids[-1])
    elif choice["finish_reason"] == "length":
        assert choice["stop_reason"] is None and len(ids) == MAX_TOKENS


def greedy(served: Served, prompts: list[list[int]], **body: Any) -> dict[str, Any]:
    out = served.complete(prompt=prompts, max_tokens=MAX_TOKENS, temperature=0, **body)
    assert [c["index"] for c in out["choices"]] == list(range(len(prompts)))
    assert out["usage"]["completion_tokens"] == sum(len(c["token_ids"]) for c in out["choices"])
    assert out["usage"]["prompt_tokens"] == sum(len(p) for p in prompts)
    return out


@pytest.fixture(scope="module")
def turn_ends(served: Served) -> list[tuple[list[int], list[int]]]:
    """(prompt, completion ids) of the greedy completions that end on the chat template's
    end-of-turn token when the request names it in ``stop_token_ids``, before ``MAX_TOKENS``."""
    eot = served.end_of_turn
    assert eot is not None, "the served model's chat template has no end-of-turn token"
    prompts = chat_prompts(served)
    out = greedy(served, prompts, stop_token_ids=[eot])
    found = []
    for prompt, choice in zip(prompts, out["choices"], strict=True):
        check_choice(choice, served.eos_ids | {eot}, served.primary_eos)
        ids = choice["token_ids"]
        if choice["finish_reason"] == "stop" and ids[-1] == eot and len(ids) < MAX_TOKENS:
            assert choice["stop_reason"] == (None if eot == served.primary_eos else eot)
            found.append((prompt, ids))
    assert found, "no prompt made the model end its turn; the stop-set checks cannot run"
    return found


def test_stop_set_is_eos_generation_eos_and_request_ids_nothing_else(
    served: Served, turn_ends: list[tuple[list[int], list[int]]]
) -> None:
    """[SP-eos] [STOP]: without ``stop_token_ids`` a model whose EOS is not the end-of-turn
    token (the Qwen3 *-Base layout) writes past ``<|im_end|>``; with it, it stops there."""
    eot = served.end_of_turn
    prompts = [prompt for prompt, _ in turn_ends]
    out = greedy(served, prompts)  # the request names no stop token
    for (_, stopped), choice in zip(turn_ends, out["choices"], strict=True):
        check_choice(choice, served.eos_ids, served.primary_eos)
        ids = choice["token_ids"]
        assert ids[: len(stopped)] == stopped  # greedy: the same tokens up to the turn's end
        if eot in served.eos_ids:  # an instruct layout: the server stops there by itself
            assert ids == stopped
        else:
            assert len(ids) > len(stopped), "stopped on a token outside the stop set"


def test_request_stop_token_id_ends_generation_with_its_id(served: Served) -> None:
    """[STOP] [DETOK]: a token named in ``stop_token_ids`` ends the completion right after it,
    with ``stop_reason`` = its id; it is not in the text unless
    ``include_stop_str_in_output``; usage counts it."""
    prompts = chat_prompts(served)[:4]
    first = greedy(served, prompts)["choices"]
    for prompt, choice in zip(prompts, first, strict=True):
        token = choice["token_ids"][0]
        if token in served.eos_ids or len(choice["token_ids"]) < 2:
            continue
        for include in (False, True):
            out = greedy(
                served, [prompt], stop_token_ids=[token], include_stop_str_in_output=include
            )
            (stopped,) = out["choices"]
            assert stopped["token_ids"] == [token]
            assert (stopped["finish_reason"], stopped["stop_reason"]) == ("stop", token)
            assert out["usage"]["completion_tokens"] == 1
            shown = served.tokenizer.decode([token], skip_special_tokens=True)
            assert stopped["text"] == (shown if include else "")
        return
    pytest.fail("no completion started with a non-EOS token")


def incremental_pieces(served: Served, token_ids: list[int]) -> list[str]:
    """The text each token adds, as vLLM's fast detokenizer computes it (tokenizers'
    ``DecodeStream`` with skip_special_tokens, as in vllm/v1/engine/detokenizer.py)."""
    from tokenizers.decoders import DecodeStream

    stream = DecodeStream(skip_special_tokens=True)
    backend = served.tokenizer.backend_tokenizer
    return [stream.step(backend, t) or "" for t in token_ids]


def test_stop_string_ends_generation_at_the_completing_token(served: Served) -> None:
    """[DETOK] [PROTO]: a stop string ends generation at the token that completes it: token ids
    and ``usage.completion_tokens`` end there, ``finish_reason`` "stop", ``stop_reason`` the
    string; the text stops before the string, or after it with
    ``include_stop_str_in_output``."""
    prompts = chat_prompts(served)
    free = greedy(served, prompts)["choices"]
    for prompt, choice in zip(prompts, free, strict=True):
        ids = choice["token_ids"]
        pieces = incremental_pieces(served, ids)
        for j in range(2, len(ids) - 2):
            before, stop = "".join(pieces[:j]), pieces[j]
            if len(stop.strip()) < 2 or stop in before or set(ids[: j + 1]) & served.eos_ids:
                continue
            for include in (False, True):
                out = greedy(served, [prompt], stop=[stop], include_stop_str_in_output=include)
                (cut,) = out["choices"]
                assert cut["token_ids"] == ids[: j + 1]
                assert out["usage"]["completion_tokens"] == j + 1
                assert (cut["finish_reason"], cut["stop_reason"]) == ("stop", stop)
                assert cut["text"] == (before + stop if include else before)
            return
    pytest.fail("no completion had a usable stop string")


def test_skip_special_tokens_and_stop_token_text(
    served: Served, turn_ends: list[tuple[list[int], list[int]]]
) -> None:
    """[PROTO] [DETOK]: special tokens are left out of the text by default and kept with
    ``skip_special_tokens: false``; a stop token's own text only with
    ``include_stop_str_in_output``."""
    eot = served.end_of_turn
    assert eot is not None
    eot_text = served.tokenizer.convert_ids_to_tokens(eot)
    prompt, stopped = turn_ends[0]
    body = {"stop_token_ids": [eot], "skip_special_tokens": False}
    kept = greedy(served, [prompt], include_stop_str_in_output=True, **body)["choices"][0]
    dropped = greedy(served, [prompt], **body)["choices"][0]
    assert kept["token_ids"] == dropped["token_ids"] == stopped
    assert kept["text"].endswith(eot_text) and kept["text"] == dropped["text"] + eot_text
    assert eot_text not in dropped["text"]
    if eot not in served.eos_ids:  # it runs past <|im_end|>: the token is in the text or not
        raw = greedy(served, [prompt], skip_special_tokens=False)["choices"][0]
        clean = greedy(served, [prompt])["choices"][0]
        assert raw["token_ids"] == clean["token_ids"]
        assert eot_text in raw["text"] and eot_text not in clean["text"]


def test_n_samples_with_seed(served: Served) -> None:
    """[SP-greedy] [PROTO]: ``n`` samples per prompt, prompt-major indices; the same ``seed``
    gives the same samples; greedy sampling needs ``n`` = 1; seed -1 is no seed."""
    prompts = chat_prompts(served)[:2]
    body = {"prompt": prompts, "n": 3, "max_tokens": 16, "temperature": 1.0, "top_p": 1.0}
    first = served.complete(seed=1234, **body)
    again = served.complete(seed=1234, **body)
    assert [c["index"] for c in first["choices"]] == list(range(6))
    samples = [c["token_ids"] for c in first["choices"]]
    assert samples == [c["token_ids"] for c in again["choices"]]
    assert len({tuple(s) for s in samples[:3]}) > 1, "the n samples of a prompt are all equal"
    assert first["usage"]["prompt_tokens"] == sum(len(p) for p in prompts)
    assert served.complete(seed=-1, **body)["choices"]
    refused = served.post(
        "/v1/completions",
        {"model": served.base, "prompt": prompts[0], "n": 2, "temperature": 0, "max_tokens": 4},
    )
    assert refused.status_code == 400
    assert "n must be 1 when using greedy sampling" in refused.text


# ------------------------------------------------------------------------------------- LoRA


def write_adapter(served: Served, name: str, *, r: int, seed: int = 0, **lora: Any) -> Path:
    """A PEFT LoRA adapter for the served model, random (non-zero) weights, written without
    loading the model's weights (its modules are built on the meta device)."""
    import torch
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(served.model_dir)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    target = lora.pop("target_modules", ["q_proj", "v_proj"])
    peft_model = get_peft_model(
        skeleton, LoraConfig(r=r, lora_alpha=2 * r, target_modules=target, **lora)
    )
    generator = torch.Generator().manual_seed(seed)
    tensors = {
        key: torch.randn(tuple(value.shape), generator=generator) * 0.2
        for key, value in get_peft_model_state_dict(peft_model).items()
    }
    out = served.adapter_dir / name
    shutil.rmtree(out, ignore_errors=True)
    peft_model.peft_config["default"].save_pretrained(str(out))
    save_file(tensors, str(out / "adapter_model.safetensors"))
    return out


def load(served: Served, name: str, path: Path) -> Any:
    return served.post("/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(path)})


def test_lora_rank_limit_counts_rank_pattern(served: Served) -> None:
    """[LORA]: the rank checked against ``max_lora_rank`` is the largest of ``r`` and every
    ``rank_pattern`` value; an adapter within the limit (rank_pattern, alpha_pattern) loads."""
    limit = served.max_lora_rank
    over = write_adapter(served, "contract-over", r=8, rank_pattern={"q_proj": 2 * limit})
    refused = load(served, "contract-over", over)
    if refused.status_code == 200:  # leave the server as found, then fail
        served.post("/v1/unload_lora_adapter", {"lora_name": "contract-over"})
    assert refused.status_code == 400
    assert f"LoRA rank {2 * limit} is greater than max_lora_rank {limit}" in refused.text
    assert "contract-over" not in served.model_ids()

    within = write_adapter(
        served,
        "contract-within",
        r=8,
        rank_pattern={"q_proj": limit},
        alpha_pattern={"v_proj": 4.0},
    )
    assert load(served, "contract-within", within).status_code == 200
    try:
        assert "contract-within" in served.model_ids()
        prompt = chat_prompts(served)[0]
        tuned = served.complete(model="contract-within", prompt=prompt, max_tokens=8, temperature=0)
        base = served.complete(prompt=prompt, max_tokens=8, temperature=0)
        assert tuned["choices"][0]["token_ids"] != base["choices"][0]["token_ids"]
    finally:
        served.post("/v1/unload_lora_adapter", {"lora_name": "contract-within"})


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"use_dora": True}, "DoRA"),
        ({"bias": "all"}, "Adapter bias is not supported."),
    ],
    ids=["dora", "bias"],
)
def test_peft_features_vllm_does_not_implement_are_refused(
    served: Served, change: dict[str, Any], message: str
) -> None:
    """[LORA]: adapters whose config asks for what vLLM does not implement are refused at load
    (before their weights are read)."""
    name = "contract-" + "-".join(str(key) for key in change)
    path = write_adapter(served, name, r=4)
    config = json.loads((path / "adapter_config.json").read_text())
    (path / "adapter_config.json").write_text(json.dumps({**config, **change}))
    refused = load(served, name, path)
    if refused.status_code == 200:  # leave the server as found, then fail
        served.post("/v1/unload_lora_adapter", {"lora_name": name})
    assert refused.status_code == 400 and message in refused.text
    assert name not in served.model_ids()
