"""Atomic training checkpoints and the exact-resume state they carry.

A checkpoint directory `step-000123/` holds everything needed to continue bit-for-bit:
`adapter/` (standard PEFT format: adapter_config.json + adapter_model.safetensors), the
optimizer and LR-scheduler state, every RNG state (python, numpy, torch CPU and CUDA), and
`trainer_state.json` (step, data position, token counters, the spec). It is written into a
temporary sibling directory and renamed into place only when complete, so a crash mid-write
never leaves a directory that looks like a checkpoint. Retention (`checkpoint.keep_last`) removes
old ones only after a newer one is complete, each by one rename out of the namespace. Files get
the mode a plain `open()` gives (safetensors alone would leave the weights 0600).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

STATE_FILE = "trainer_state.json"
RANK_RNG_FILE = "rng-ranks.pt"
ADAPTER_DIR = "adapter"
_STEP_DIR = re.compile(r"^step-(\d+)$")


@dataclass
class TrainerState:
    step: int = 0  # optimizer steps completed
    examples_consumed: int = 0  # position in the (seeded, per-epoch shuffled) example stream
    generated_tokens_total: int = 0
    loss_tokens_total: int = 0
    total_steps: int = 0
    spec_fingerprint: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    # the whole spec that wrote the checkpoint (`spec_to_dict`), so a resume can name each field
    # that differs; empty in checkpoints of older versions (then only the fingerprint is known)
    spec: dict[str, Any] = field(default_factory=dict)


class ResumeMismatchError(ValueError):
    """A checkpoint cannot be resumed with this spec; the message names each differing field."""


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


def capture_rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_tree(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def normalize_modes(root: str | Path) -> None:
    """Give every file under `root` the mode a plain `open()` would (0666 less the umask).

    safetensors writes `*.safetensors` through a private temporary file and keeps its 0600
    mode, so a saved model or adapter was readable by its owner only (an inference server or a
    colleague running as another user could not load it). Directories get 0777 less the umask.
    """
    mask = _umask()
    root = Path(root)
    for path in [root, *root.rglob("*")]:
        if path.is_symlink():
            continue
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


def save_checkpoint(
    directory: str | Path,
    *,
    peft_model: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    state: TrainerState,
    rank_rng_states: list[dict[str, Any]] | None = None,
) -> Path:
    """Write `directory/step-N` atomically and return its path. `rank_rng_states`: every
    data-parallel rank's RNG state, in rank order (`rng-ranks.pt`), for an exact multi-process
    resume (see :func:`read_rank_rng_states`)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / step_dir_name(state.step)
    tmp = directory / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        peft_model.save_pretrained(str(tmp / ADAPTER_DIR))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(capture_rng_state(), tmp / "rng.pt")
        if rank_rng_states is not None:
            torch.save(rank_rng_states, tmp / RANK_RNG_FILE)
        (tmp / STATE_FILE).write_text(json.dumps(asdict(state), indent=2, sort_keys=True))
        normalize_modes(tmp)
        _fsync_tree(tmp)
        if final.exists():  # re-saving a step after a resume: swap, never leave a gap
            trash = directory / f".old-{final.name}-{uuid.uuid4().hex[:8]}"
            os.rename(final, trash)
            os.rename(tmp, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def list_checkpoints(directory: str | Path) -> list[Path]:
    """Complete checkpoints in `directory`, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for child in directory.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and (child / STATE_FILE).is_file() and (child / ADAPTER_DIR).is_dir():
            found.append((int(match.group(1)), child))
    return [path for _, path in sorted(found)]


def retired_checkpoints(
    directory: str | Path, *, keep_last: int, final_step: int | None = None
) -> list[Path]:
    """The complete checkpoints retention removes: all but the `keep_last` newest, never the
    one at `final_step` (the end of the run is kept in addition). Oldest first."""
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    steps = [(read_state(path).step, path) for path in list_checkpoints(directory)]
    periodic = [path for step, path in steps if step != final_step]
    return periodic[: max(0, len(periodic) - keep_last)]


def remove_checkpoint(path: str | Path) -> None:
    """Remove a checkpoint directory atomically: it is renamed out of the checkpoint namespace
    first (so it is no checkpoint from that instant on, even if the process dies while the files
    are deleted), then deleted. Leftovers of an earlier interrupted removal go too."""
    path = Path(path)
    trash = path.parent / f".old-{path.name}-{uuid.uuid4().hex[:8]}"
    os.rename(path, trash)
    shutil.rmtree(trash, ignore_errors=True)
    for leftover in path.parent.glob(".old-step-*"):
        shutil.rmtree(leftover, ignore_errors=True)


def latest_checkpoint(directory: str | Path) -> Path | None:
    checkpoints = list_checkpoints(directory)
    return checkpoints[-1] if checkpoints else None


def read_state(checkpoint: str | Path) -> TrainerState:
    data = json.loads((Path(checkpoint) / STATE_FILE).read_text())
    return TrainerState(**data)


def load_checkpoint(
    checkpoint: str | Path,
    *,
    peft_model: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    restore_rng: bool = True,
) -> TrainerState:
    """Load adapter weights, optimizer, scheduler (and RNG) from a checkpoint; return its state."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    checkpoint = Path(checkpoint)
    weights = load_file(str(checkpoint / ADAPTER_DIR / "adapter_model.safetensors"))
    result = set_peft_model_state_dict(peft_model, weights)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise RuntimeError(
            f"checkpoint {checkpoint} does not match the model: unexpected {unexpected[:5]}"
        )
    device = next(iter(peft_model.parameters())).device
    optimizer.load_state_dict(
        torch.load(checkpoint / "optimizer.pt", map_location=device, weights_only=True)
    )
    scheduler.load_state_dict(torch.load(checkpoint / "scheduler.pt", weights_only=True))
    if restore_rng:
        restore_rng_state(torch.load(checkpoint / "rng.pt", weights_only=False))
    return read_state(checkpoint)


def read_rank_rng_states(checkpoint: str | Path) -> list[dict[str, Any]] | None:
    """The per-rank RNG states a multi-process run saved (rank order), or None."""
    path = Path(checkpoint) / RANK_RNG_FILE
    return torch.load(path, weights_only=False) if path.is_file() else None


def save_adapter(peft_model: Any, directory: str | Path) -> Path:
    """Save the final adapter (PEFT format) atomically to `directory`."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.parent / f".tmp-{directory.name}-{uuid.uuid4().hex[:8]}"
    peft_model.save_pretrained(str(tmp))
    normalize_modes(tmp)
    _fsync_tree(tmp)
    if directory.exists():
        shutil.rmtree(directory)
    os.rename(tmp, directory)
    return directory
