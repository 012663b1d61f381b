"""Checkpoints are Hugging Face model folders: what training hands to inference, serving and the ecosystem.

    DIR/config.json              Qwen3 config (model_type "qwen3")
    DIR/model.safetensors        weights under the transformers names (a tied LM head is not stored)
    DIR/generation_config.json   bos/eos ids
    DIR/tokenizer.json ...       when a tokenizer is given
    DIR/trainer_state.pt         optional: what a resumed run needs
    DIR/adapter/                 a LoRA run's adapters in peft's format (the weights hold them merged)

A kill at any moment never loses a checkpoint: `DIR` is a relative symlink to a complete version
folder beside it (`.DIR.<id>`), and a save writes a new version, fsyncs it and switches the link
in one atomic rename (see `qwen3.atomic`). Loading accepts any such folder, a real Qwen3 release
included, and a folder that is missing, truncated or mismatched fails with a `CheckpointError`
naming the file and the problem. `resume_state` is what `--resume` continues from.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from qwen3.atomic import atomic_directory, recover
from qwen3.config import ModelConfig
from qwen3.errors import UserError, read_json_object
from qwen3.model.decoder import Qwen3ForCausalLM
from qwen3.model.lora import lora_layers, plain_state_dict, save_adapter

WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
TRAINER_STATE_NAME = "trainer_state.pt"
GENERATION_CONFIG_NAME = "generation_config.json"
CHECKPOINT_NAMES = ("best", "last")  # the checkpoints of a run folder, in the order a reader prefers them
ADAPTER_FOLDER = "adapter"  # a LoRA run's adapters alone, in peft's format
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}


class CheckpointError(UserError):
    """A checkpoint folder that cannot be loaded; the message names the file and what is wrong."""


def save_model(model: Qwen3ForCausalLM, path: str | Path, tokenizer: Any = None,
               trainer_state: dict[str, Any] | None = None) -> Path:
    """Write `model` (and optionally its tokenizer and trainer state) as a HF folder at `path`."""
    config = model.config
    # LoRA adapters, if any, merged into the weights under the plain names (qwen3/model/lora.py).
    state = {name: tensor.detach().contiguous().cpu() for name, tensor in plain_state_dict(model).items()}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # the same tensor as model.embed_tokens.weight
    dtype = next(iter(state.values())).dtype
    with atomic_directory(path) as folder:
        hf_config = config.to_hf_dict()
        hf_config["torch_dtype"] = DTYPE_NAMES.get(dtype, "float32")
        write_json(folder / "config.json", hf_config)
        save_file(state, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
        generation = {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id}
        if tokenizer is not None:
            generation["eos_token_id"] = list(tokenizer.stop_token_ids) or config.eos_token_id
            generation["pad_token_id"] = tokenizer.pad_token_id
            tokenizer.save_pretrained(folder)
        write_json(folder / GENERATION_CONFIG_NAME, generation)
        if trainer_state is not None:
            torch.save(trainer_state, folder / TRAINER_STATE_NAME)
        if lora_layers(model):
            save_adapter(model, folder / ADAPTER_FOLDER)
    return Path(path)


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder as given, or a run folder's best/ (else last/) checkpoint."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such folder")
    if (path / "config.json").is_file():
        return path
    for name in CHECKPOINT_NAMES:
        if (path / name / "config.json").is_file():
            return path / name
    raise CheckpointError(f"{path}: not a checkpoint folder (no config.json) nor a run folder "
                          f"(no best/ or last/ checkpoint)")


def run_name(folder: Path) -> str:
    """What to call a checkpoint: its run folder's name for a run's best/ or last/, else its own.
    (abspath, not resolve: a checkpoint is a link to a hidden version folder whose name is not the
    checkpoint's.)"""
    absolute = Path(os.path.abspath(folder))
    return absolute.parent.name if absolute.name in CHECKPOINT_NAMES else absolute.name


def load_config(folder: str | Path) -> ModelConfig:
    """The ModelConfig of a checkpoint folder's config.json."""
    file = Path(folder) / "config.json"
    data = read_json_object(file, CheckpointError)
    try:
        return ModelConfig.from_hf_dict(data)
    except (UserError, TypeError) as error:
        raise CheckpointError(f"{file}: {error}") from None


def load_generation_config(folder: str | Path) -> dict[str, Any]:
    """A checkpoint folder's generation_config.json (eos ids, sampling defaults), {} when it has none."""
    file = Path(folder) / GENERATION_CONFIG_NAME
    return read_json_object(file, CheckpointError) if file.is_file() else {}


def weight_files(folder: Path) -> list[Path]:
    """model.safetensors, or the shards its index lists."""
    index = folder / WEIGHTS_INDEX_NAME
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError) as error:
            raise CheckpointError(f"{index}: not a valid safetensors index ({error})") from None
    else:
        names = [WEIGHTS_NAME]
    files = [folder / name for name in names]
    for file in files:
        if not file.is_file():
            raise CheckpointError(f"{file}: missing")
    return files


@dataclass(frozen=True)
class StoredTensor:
    """Where one tensor lies in a safetensors file: its bytes [start, end) of the file."""

    file: Path
    shape: tuple[int, ...]
    dtype: torch.dtype
    start: int
    end: int


def read_header(file: Path) -> dict[str, StoredTensor]:
    """The tensors a safetensors file holds, from its header alone. The format: 8 bytes of header
    length (little-endian), a JSON object {name: {"dtype", "shape", "data_offsets": [begin, end]}}
    (offsets counted from the end of the header), then the data."""
    size = file.stat().st_size
    try:
        with open(file, "rb") as handle:
            length = int.from_bytes(handle.read(8), "little")
            if not 2 <= length <= size - 8:
                raise ValueError(f"a header of {length} bytes in a file of {size}")
            header = json.loads(handle.read(length))
        tensors = {}
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            dtype = SAFETENSORS_DTYPES[entry["dtype"]]
            begin, end = entry["data_offsets"]
            shape = tuple(entry["shape"])
            if end - begin != math.prod(shape) * dtype.itemsize or 8 + length + end > size:
                raise ValueError(f"{name} does not fit the file")
            tensors[name] = StoredTensor(file, shape, dtype, 8 + length + begin, 8 + length + end)
    except (ValueError, KeyError, TypeError, UnicodeDecodeError, OSError) as error:
        raise CheckpointError(f"{file}: unreadable or truncated safetensors file ({error})") from None
    return tensors


def weight_layout(folder: Path) -> dict[str, StoredTensor]:
    """Every stored tensor of a checkpoint folder, from its files' headers alone."""
    return {name: tensor for file in weight_files(folder) for name, tensor in read_header(file).items()}


def stored_dtype(folder: str | Path) -> torch.dtype:
    """The dtype a checkpoint's weights are stored in (that of its largest tensor)."""
    layout = weight_layout(find_checkpoint(folder))
    return max(layout.values(), key=lambda tensor: math.prod(tensor.shape)).dtype


def load_model(path: str | Path, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32, attention: str = "sdpa") -> Qwen3ForCausalLM:
    """Load a Hugging Face Qwen3 folder (ours or any other) into our model, in eval mode, its
    weights in `dtype` on `device`. Each tensor is read with plain reads (no memory map, whose pages
    would count as the process's) straight into its place, or through a small buffer when it must
    be converted, so memory peaks at the model in `dtype` plus that buffer, never at a second copy
    of the weights."""
    folder = find_checkpoint(path)
    config = load_config(folder)
    layout = weight_layout(folder)
    if config.tie_word_embeddings:
        layout.pop("lm_head.weight", None)
    with torch.device("meta"):
        model = Qwen3ForCausalLM(config, attention)
    expected = {name: tuple(p.shape) for name, p in model.state_dict().items()}
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight")
    weights_file = folder / WEIGHTS_NAME
    missing = sorted(set(expected) - set(layout))
    unexpected = sorted(set(layout) - set(expected))
    if missing:
        raise CheckpointError(f"{weights_file}: missing tensors {missing[:5]}"
                              f"{' ...' if len(missing) > 5 else ''} for the shape in config.json")
    if unexpected:
        raise CheckpointError(f"{weights_file}: unexpected tensors {unexpected[:5]}"
                              f"{' ...' if len(unexpected) > 5 else ''}")
    for name, shape in expected.items():
        if layout[name].shape != shape:
            raise CheckpointError(f"{layout[name].file}: {name} has shape {layout[name].shape}, "
                                  f"config.json implies {shape}")
    device = torch.device(device)
    # one conversion buffer for the whole load: a buffer per tensor left the allocator holding
    # freed ones between the loaded weights (up to ~25 MB more resident, at random)
    converted = [layout[name] for name in expected if layout[name].dtype != dtype or device.type != "cpu"]
    buffer = torch.empty(min(CONVERSION_BUFFER_BYTES, max((tensor.end - tensor.start for tensor in converted),
                                                          default=0)), dtype=torch.uint8)
    state = {name: read_tensor(layout[name], dtype, device, buffer) for name in expected}
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.model.rotary_emb.reset_tables(device)
    return model.eval()


CONVERSION_BUFFER_BYTES = 16 << 20


def read_tensor(stored: StoredTensor, dtype: torch.dtype, device: torch.device, buffer: torch.Tensor) -> torch.Tensor:
    """One stored tensor as a new tensor in `dtype` on `device`. Bytes already in the wanted form
    are read straight into it; others pass through `buffer` (uint8, on the CPU), converted slice by
    slice, so no whole stored copy is ever held beside the result."""
    result = torch.empty(stored.shape, dtype=dtype, device=device)
    flat = result.view(-1)
    size = stored.dtype.itemsize
    direct = dtype == stored.dtype and device.type == "cpu"
    step = max(1, flat.numel() if direct else len(buffer) // size)
    staging = flat if direct else buffer[:step * size].view(stored.dtype)
    try:
        with open(stored.file, "rb") as handle:
            handle.seek(stored.start)
            for begin in range(0, flat.numel(), step):
                piece = staging[:min(step, flat.numel() - begin)]
                if handle.readinto(piece.view(torch.uint8).numpy()) != piece.numel() * size:
                    raise ValueError("the file ends early")
                if not direct:
                    flat[begin:begin + piece.numel()].copy_(piece)
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{stored.file}: unreadable or truncated safetensors file ({error})") from None
    return result


def load_trainer_state(path: str | Path, mmap: bool = False) -> dict[str, Any]:
    """The trainer_state.pt of a checkpoint folder (for resuming).

    `mmap=True` maps the tensors (optimizer states) instead of reading them: for a caller that only
    looks at the step or the configs, which then costs no time or memory whatever the model's size.
    """
    file = Path(path) / TRAINER_STATE_NAME
    if not file.is_file():
        raise CheckpointError(f"{file}: missing; this checkpoint cannot be resumed")
    try:
        return torch.load(file, map_location="cpu", weights_only=False, mmap=mmap)
    except Exception as error:  # torch raises many types for a damaged pickle
        raise CheckpointError(f"{file}: unreadable ({error})") from None


def last_checkpoint(run_dir: str | Path) -> Path | None:
    """`run_dir/last`, made whole first if a kill interrupted a save (`recover`, best/ too), or
    None when the run saved none."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return None
    for name in CHECKPOINT_NAMES:
        recover(run_dir / name)
    last = run_dir / "last"
    return last if last.is_dir() else None


def resume_state(run_dir: str | Path, mmap: bool = False) -> dict[str, Any]:
    """The trainer state that `--resume run_dir` continues from; a CheckpointError says why there is none."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"{run_dir}: no such folder, nothing to resume")
    if (run_dir / "config.json").is_file():
        raise CheckpointError(f"{run_dir} is a checkpoint folder; --resume takes the run folder "
                              f"that holds last/ ({run_dir.resolve().parent})")
    last = last_checkpoint(run_dir)
    if last is None:
        raise CheckpointError(f"nothing to resume in {run_dir}: it holds no last/ checkpoint (a run "
                              f"saves one at every evaluation and when it is stopped)")
    if not (last / TRAINER_STATE_NAME).is_file():
        raise CheckpointError(f"{last} has no {TRAINER_STATE_NAME}: it holds a model but not the "
                              f"training state a resume needs")
    return load_trainer_state(last, mmap)
