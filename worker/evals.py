"""Running one eval on this worker: claim, sample, grade, store (no Celery in here).

`run_eval(eval_id, ...)` is what the Celery task `opsd.run_eval` calls and what the tests call
directly. It claims the eval row under a lease (renewed from a thread), then:

1. resolves the adapter: the job's final adapter, or the adapter of the checkpoint at
   ``config.checkpoint_step``; its name on the inference server is ``<job_id>-step<N>``
   (immutable: one name, one set of weights);
2. loads the benchmark (``problem``/``answer`` fields; a row without an answer uses the last
   ``\\boxed{}`` of its solution) and builds the student prompt of training for each problem
   (the job's prompt templates and chat template, thinking mode per the eval's config);
3. samples ``n`` completions per problem:

   * with ``settings.inference_url`` (vLLM, or `opsd serve-adapters`): over HTTP -- the adapter
     is loaded if ``/v1/models`` does not list it, the prompts go to ``/v1/completions`` as token
     ids, the base model (adapter off) answers under the server's base model name;
   * without one (the embedded default): in-process with
     :func:`opsd_engine.evaluation.evaluate_model` on the base model + PEFT adapter (base runs
     under ``disable_adapter()``);

4. grades (:func:`opsd_engine.evaluation.evaluate_texts`, or inside ``evaluate_model``) and stores
   ``{"adapter": summary, "base": summary | None, ...}``: each summary is
   ``BenchmarkSummary.to_dict()`` whose ``problems`` rows also carry the problem, the reference
   answer and every sample (extracted answer, correctness, text cut to
   :data:`MAX_SAMPLE_TEXT` characters).

It ends in exactly one terminal write (``finish_eval`` or ``fail_eval`` with a readable error),
unless the lease was lost to another worker. If this worker dies, the reaper requeues the eval for
another attempt (``worker.reaper``), up to ``EVAL_MAX_ATTEMPTS`` runs.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from jobstore.records import SUCCEEDED, JobError
from opsd_service.settings import ServiceSettings
from worker import prometheus as worker_metrics
from worker.subtasks import TaskLease, log_failure

log = logging.getLogger("opsd.worker")

SKIPPED = "skipped"
LEASE_LOST = "lease_lost"
EVAL_LEASE_SECONDS = 300.0
MAX_SAMPLE_TEXT = 2000
MAX_PROBLEM_TEXT = 1000
SEQUENCES_PER_REQUEST = 256  # prompts per /v1/completions call = max(1, this // n)
IN_PROCESS_SEED = 0


class EvalSetupError(RuntimeError):
    """The eval cannot run as asked (job or adapter gone, ...): a user-facing error."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class AdapterRef:
    step: int
    uri: str
    name: str  # immutable name on the inference server


# ----------------------------------------------------------------------------------- runner
def run_eval(
    eval_id: str,
    *,
    store: Any,
    settings: ServiceSettings,
    worker_id: str,
    lease_seconds: float = EVAL_LEASE_SECONDS,
) -> str:
    """Claim and run one eval; returns ``succeeded``, ``failed``, ``skipped`` or ``lease_lost``."""
    record = store.claim_eval(eval_id, worker_id, lease_seconds=lease_seconds)
    if record is None:
        log.info("eval %s not claimable; skipping", eval_id)
        return SKIPPED
    log.info("eval %s of job %s claimed by %s", eval_id, record.job_id, worker_id)
    progress = EvalProgressReport(store, record, worker_id)
    worker_metrics.job_started(eval_id, "eval")
    lease = TaskLease(
        "eval",
        eval_id,
        partial(store.renew_eval_lease, eval_id, worker_id, lease_seconds=lease_seconds),
        lease_seconds,
        on_renewal=worker_metrics.lease_renewed,
    )
    with lease, _finished_metrics():
        try:
            from opsd_engine.access import enforcing
            from worker.access import tenant_guard

            with enforcing(tenant_guard(store, settings, record.tenant_id)):  # policy at open
                results = compute_eval(record, store=store, settings=settings, progress=progress)
        except Exception as exc:
            if lease.lost.is_set():
                return LEASE_LOST
            error = classify_eval_error(exc)
            log_failure("eval", eval_id, error)
            store.fail_eval(eval_id, error=error, worker_id=worker_id)
            progress.event("eval_failed", f"eval {eval_id} failed: {error.code}", {})
            return "failed"
    if lease.lost.is_set():
        return LEASE_LOST
    if not store.finish_eval(eval_id, results=results, worker_id=worker_id):
        return LEASE_LOST
    avg = (results.get("adapter") or {}).get("avg_at_n")
    score = f": avg@n {avg:.3f}" if isinstance(avg, int | float) else ""
    progress.event("eval_finished", f"eval {eval_id} finished{score}", {"avg_at_n": avg})
    return "succeeded"


@contextlib.contextmanager
def _finished_metrics() -> Iterator[None]:
    try:
        yield
    finally:
        worker_metrics.job_finished()


class EvalProgressReport:
    """Where a running eval's progress goes: the eval row (`progress`: role, problems done of
    total, samples per second; what `GET /evals/{id}` shows) and its job's events
    (`eval_started`, throttled `eval_progress`, `eval_finished` / `eval_failed`). Store errors
    are logged, never raised: progress must not fail an eval."""

    def __init__(self, store: Any, record: Any, worker_id: str) -> None:
        self.store, self.record, self.worker_id = store, record, worker_id

    def event(self, kind: str, message: str, data: dict[str, Any]) -> None:
        try:
            self.store.add_event(
                self.record.job_id, kind, message, {"eval_id": self.record.id, **data}
            )
        except Exception as exc:
            log.warning("eval %s: could not record %s: %s", self.record.id, kind, exc)

    def for_role(self, role: str, total: int) -> Any:
        """A progress callback for sampling `role` ("adapter" or "base") on `total` problems."""
        from opsd_engine.evaluation import EvalProgress, throttled

        eval_id = self.record.id
        self.event(
            "eval_started",
            f"eval {eval_id}: sampling the {role} on {total} problems",
            {"role": role, "done": 0, "total": total},
        )

        def report(progress: EvalProgress) -> None:
            document = {"role": role, **progress.to_dict()}
            try:
                self.store.set_eval_progress(eval_id, self.worker_id, document)
            except Exception as exc:
                log.warning("eval %s: could not record progress: %s", eval_id, exc)
            if progress.done:
                self.event(
                    "eval_progress",
                    f"eval {eval_id} ({role}): {progress.done}/{progress.total} problems, "
                    f"{progress.samples_per_s:.1f} samples/s",
                    document,
                )

        return throttled(report)


def classify_eval_error(exc: BaseException) -> JobError:
    from opsd_engine.evaluation import EvalDataError
    from worker.inference_client import InferenceError
    from worker.runner import _clip, classify_error

    if isinstance(exc, EvalSetupError):
        return JobError(exc.code, _clip(str(exc)), "user")
    if isinstance(exc, EvalDataError):
        return JobError("dataset_error", _clip(str(exc)), "user")
    if isinstance(exc, InferenceError):
        return JobError("inference_error", _clip(str(exc)), "system")
    return classify_error(exc)


def resolve_adapter(store: Any, job: Any, checkpoint_step: int | None) -> AdapterRef:
    """The adapter an eval scores: the final one, or the one of checkpoint ``checkpoint_step``."""
    if checkpoint_step is None:
        if job.status != SUCCEEDED or not job.adapter_uri:
            raise EvalSetupError(
                "adapter_not_ready", f"job {job.id} is {job.status}; it has no final adapter"
            )
        step = int(job.progress_step)
        return AdapterRef(step, job.adapter_uri, f"{job.id}-step{step}")
    for checkpoint in store.list_checkpoints(job.id):
        if checkpoint.step == checkpoint_step:
            from opsd_engine.checkpoint import ADAPTER_DIR

            uri = f"{checkpoint.uri.rstrip('/')}/{ADAPTER_DIR}"
            return AdapterRef(checkpoint.step, uri, f"{job.id}-step{checkpoint.step}")
    raise EvalSetupError(
        "checkpoint_not_found", f"job {job.id} has no checkpoint at step {checkpoint_step}"
    )


def compute_eval(
    record: Any,
    *,
    store: Any,
    settings: ServiceSettings,
    progress: EvalProgressReport | None = None,
) -> dict[str, Any]:
    """Sample and grade the eval described by ``record``; the results document it stores.
    ``progress`` receives the sampling progress of each model (adapter, then base)."""
    from opsd_engine.config import parse_spec
    from opsd_engine.data import load_examples
    from opsd_engine.evaluation import EvalSettings, reference_answers

    config = record.config
    job = store.get_job(record.job_id)
    if job is None:
        raise EvalSetupError("job_not_found", f"job {record.job_id} no longer exists")
    adapter = resolve_adapter(store, job, config.get("checkpoint_step"))
    spec = parse_spec(job.spec, source=f"job {job.id}")
    examples = load_examples(
        config["dataset_uri"],
        problem_field=config.get("problem_field", "problem"),
        solution_field="solution",
        answer_field=config.get("answer_field", "answer"),
        require_solution=False,
        limit=config.get("limit"),
    )
    answers = reference_answers(examples)
    eval_settings = EvalSettings(
        n=int(config.get("n", 16)),
        max_new_tokens=int(config.get("max_new_tokens", 2048)),
        temperature=float(config.get("temperature", 0.6)),
        top_p=float(config.get("top_p", 0.95)),
        top_k=int(config.get("top_k", 0)),
        thinking=config.get("thinking"),
    )
    include_base = bool(config.get("include_base", False))

    def reporter(role: str) -> Any:
        return progress.for_role(role, len(examples)) if progress is not None else None

    if settings.inference_url:
        runs = _sample_over_http(
            settings.inference_url,
            spec,
            adapter,
            examples,
            answers,
            eval_settings,
            include_base,
            reporter=reporter,
        )
    else:
        runs = _sample_in_process(
            spec, adapter, examples, eval_settings, include_base, reporter=reporter
        )
    out: dict[str, Any] = {"adapter": None, "base": None}
    for role, result in runs.items():
        out[role] = _summary_document(result, examples, answers)
    out["step"] = adapter.step
    out["adapter_uri"] = adapter.uri
    out["backend"] = "http" if settings.inference_url else "in_process"
    return out


def _summary_document(result: Any, examples: list[Any], answers: list[str]) -> dict[str, Any]:
    """``BenchmarkSummary.to_dict()`` with the problem, answer and samples in each problem row."""
    document = result.summary.to_dict()
    by_problem: dict[int, list[dict[str, Any]]] = {}
    for sample in result.samples:
        by_problem.setdefault(sample.problem_index, []).append(
            {
                "index": sample.sample_index,
                "extracted": sample.extracted,
                "correct": sample.correct,
                "decided_by": sample.decided_by,
                "num_tokens": sample.num_tokens,
                "text": _cut(sample.text, MAX_SAMPLE_TEXT),
            }
        )
    for row in document["problems"]:
        index = row["index"]
        row["problem"] = _cut(examples[index].problem, MAX_PROBLEM_TEXT)
        row["answer"] = answers[index]
        row["samples"] = by_problem.get(index, [])
    return document


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ------------------------------------------------------------------------------- sampling
Runs = dict[str, Any]  # "adapter" / "base" -> opsd_engine.evaluation.EvalResult


def _prompt_ids(tokenizer: Any, spec: Any, examples: list[Any], settings: Any) -> list[list[int]]:
    from opsd_engine.evaluation import student_prompt_ids

    thinking = settings.thinking if settings.thinking is not None else spec.prompts.student_thinking
    return [
        student_prompt_ids(
            tokenizer,
            example.problem,
            spec.prompts,
            thinking=thinking,
            system_prompt=example.system_prompt,
        )
        for example in examples
    ]


def _sample_over_http(
    url: str,
    spec: Any,
    adapter: AdapterRef,
    examples: list[Any],
    answers: list[str],
    settings: Any,
    include_base: bool,
    *,
    reporter: Any = None,
) -> Runs:
    import time

    from opsd_engine.evaluation import EvalProgress, evaluate_texts
    from opsd_engine.modeling import load_generation_config, load_tokenizer, stop_token_ids
    from worker.inference_client import InferenceClient

    tokenizer = load_tokenizer(spec.base_model)
    prompts = _prompt_ids(tokenizer, spec, examples, settings)
    # the engine's stop set, as in process: the server stops only on EOS and these ids
    stop_ids = stop_token_ids(
        tokenizer, load_generation_config(spec.base_model), prompts=spec.prompts
    )
    per_request = max(1, SEQUENCES_PER_REQUEST // settings.n)
    runs: Runs = {}
    with InferenceClient(url) as client:
        base_name = client.base_model(expected=spec.base_model)
        client.ensure_adapter(adapter.name, adapter.uri)
        models = {"adapter": adapter.name}
        if include_base:
            models["base"] = base_name
        for role, model in models.items():
            choices: list[list[Any]] = []
            report = reporter(role) if reporter is not None else None
            began = time.perf_counter()
            if report is not None:
                report(EvalProgress(0, len(prompts), 0, 0.0))
            for start in range(0, len(prompts), per_request):
                choices.extend(
                    client.completions(
                        model=model,
                        prompts=prompts[start : start + per_request],
                        n=settings.n,
                        max_tokens=settings.max_new_tokens,
                        temperature=settings.temperature,
                        top_p=settings.top_p,
                        top_k=settings.top_k,
                        stop_token_ids=stop_ids,
                    )
                )
                if report is not None:
                    done = len(choices)
                    seconds = time.perf_counter() - began
                    report(EvalProgress(done, len(prompts), done * settings.n, seconds))
            texts = [[c.text for c in row] for row in choices]
            lengths = [[c.num_tokens or 0 for c in row] for row in choices]  # 0: not returned
            runs[role] = evaluate_texts(
                texts, answers, strip_thinking=settings.strip_thinking, num_tokens=lengths
            )
    return runs


def _sample_in_process(
    spec: Any,
    adapter: AdapterRef,
    examples: list[Any],
    settings: Any,
    include_base: bool,
    *,
    reporter: Any = None,
) -> Runs:
    import torch
    from peft import PeftModel

    from opsd_engine.evaluation import evaluate_model
    from opsd_engine.modeling import load_base_model, load_tokenizer, resolve_device, resolve_dtype

    device = resolve_device(spec.runtime.device)
    tokenizer = load_tokenizer(spec.base_model)
    base = load_base_model(
        spec.base_model,
        dtype=resolve_dtype(spec.runtime.dtype, device),
        attn_implementation=spec.runtime.attn_implementation,
    )
    runs: Runs = {}
    with tempfile.TemporaryDirectory(prefix="opsd-eval-") as scratch:
        local = _local_adapter(adapter.uri, Path(scratch))
        model = PeftModel.from_pretrained(base, str(local), is_trainable=False).to(device)
        model.eval()

        def sample(role: str) -> Any:
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                torch.manual_seed(IN_PROCESS_SEED)
                return evaluate_model(
                    model,
                    tokenizer,
                    examples,
                    settings,
                    prompts=spec.prompts,
                    device=device,
                    on_progress=reporter(role) if reporter is not None else None,
                )

        runs["adapter"] = sample("adapter")
        if include_base:
            with model.disable_adapter():
                runs["base"] = sample("base")
    return runs


def _local_adapter(uri: str, scratch: Path) -> Path:
    """A local directory holding the adapter at ``uri`` (copied from remote storage if needed)."""
    if "://" not in uri or uri.startswith("file://"):
        path = Path(uri.removeprefix("file://"))
        if not (path / "adapter_config.json").is_file():
            raise EvalSetupError("adapter_not_found", f"no adapter at {uri}")
        return path
    import fsspec

    fs, root = fsspec.core.url_to_fs(uri)
    files = [f for f in fs.find(root) if not fs.isdir(f)]
    if not files:
        raise EvalSetupError("adapter_not_found", f"no adapter at {uri}")
    prefix = root.rstrip("/") + "/"
    for remote in files:
        target = scratch / "adapter" / remote.removeprefix(prefix)
        target.parent.mkdir(parents=True, exist_ok=True)
        fs.get_file(remote, str(target))
    return scratch / "adapter"
