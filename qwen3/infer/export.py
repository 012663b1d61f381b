"""Export a checkpoint folder as GGUF, the file llama.cpp (and Ollama, LM Studio, llamafile) runs.

llama.cpp's own converter identifies a BPE tokenizer by hashing the ids of a fixed test string and
refuses any vocabulary it has not seen, which is every tokenizer trained on a user's corpus. Ours is
shaped like Qwen2/3's (byte-level BPE, the same pre-tokenization regex), so it is written directly,
with llama.cpp's `gguf` package, as a `gpt2`-model tokenizer with the `qwen2` pre-tokenizer: its
tokens, merges, token types, special ids and chat template. The weights go under llama.cpp's
`qwen3` architecture names, one tensor at a time from the safetensors file (memory stays bounded by
the largest tensor), into a temporary file that replaces OUT only once it is complete.

Types: f32, f16, bf16 (2-D weights in that type; the norm gains stay float32, as llama.cpp's
converter does) and q8_0 (2-D weights in blocks of 32 with one scale each; a matrix whose rows are
not a multiple of 32 falls back to f16).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import gguf
import numpy as np
import torch
from safetensors import safe_open

from qwen3.data.tokenizer import IM_END, load_tokenizer
from qwen3.errors import UserError, log
from qwen3.model.checkpoint import WEIGHTS_NAME, find_checkpoint, load_config, run_name

TYPES = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
         "bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0}
FILE_TYPES = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
              "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}

# Ollama's template for the ChatML turns our chat template writes (<|im_start|>role\n...<|im_end|>\n).
OLLAMA_TEMPLATE = """{{- if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ end }}{{- range .Messages }}<|im_start|>{{ .Role }}
{{ .Content }}<|im_end|>
{{ end }}<|im_start|>assistant
"""


def tensor_type(shape: tuple[int, ...], wanted: str) -> gguf.GGMLQuantizationType:
    """The GGUF type of one tensor: vectors (norm gains) in float32, matrices in the wanted type."""
    if len(shape) < 2 or wanted == "f32":
        return gguf.GGMLQuantizationType.F32
    if wanted == "q8_0" and shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0]:
        return gguf.GGMLQuantizationType.F16
    return TYPES[wanted]


def convert(tensor: torch.Tensor, kind: gguf.GGMLQuantizationType) -> np.ndarray:
    """A tensor's data in `kind`: a float array, or the quantized blocks as bytes."""
    return gguf.quants.quantize(tensor.float().numpy(), kind)


def write_tokenizer(writer: gguf.GGUFWriter, folder: Path, vocab_size: int) -> list[str]:
    """Tokens, merges, types, special ids and chat template; returns notes for the user."""
    tokenizer = load_tokenizer(folder)
    spec = json.loads(tokenizer.backend.to_str())
    if spec["model"]["type"] != "BPE" or spec.get("decoder", {}).get("type") != "ByteLevel":
        raise UserError(f"{folder}: only byte-level BPE tokenizers can be exported to GGUF "
                        f"(this one is {spec['model']['type']})")
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [gguf.TokenType.UNUSED] * vocab_size  # ids the model has but the tokenizer never emits
    for token, index in tokenizer.backend.get_vocab(with_added_tokens=True).items():
        if index >= vocab_size:
            raise UserError(f"{folder}: the tokenizer has id {index} but the model only {vocab_size} rows")
        tokens[index], types[index] = token, gguf.TokenType.NORMAL
    for index, added in tokenizer.backend.get_added_tokens_decoder().items():
        types[index] = gguf.TokenType.CONTROL if added.special else gguf.TokenType.USER_DEFINED
    merges = [merge if isinstance(merge, str) else " ".join(merge) for merge in spec["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")  # our pre-tokenization regex is Qwen2's (qwen3/data/tokenizer.py)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    if tokenizer.bos_token_id is not None:
        writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_add_bos_token(False)
    if tokenizer.pad_token_id is not None:
        writer.add_pad_token_id(tokenizer.pad_token_id)
    if (end_of_turn := tokenizer.token_to_id(IM_END)) is not None:
        writer.add_eot_token_id(end_of_turn)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)
    notes = []
    if "NFC" in json.dumps(spec.get("normalizer")):
        notes.append("the tokenizer normalizes text to Unicode NFC and llama.cpp does not: text typed in "
                     "composed form (nearly all text) tokenizes the same, but decomposed accents "
                     "(e.g. 'e' + a combining accent) give other ids than in qwen3 and transformers")
    return notes


def export_gguf(path: str | Path, out: str | Path, kind: str = "f16", force: bool = False) -> Path:
    """Write the checkpoint at `path` (a checkpoint or run folder) as GGUF at `out`; returns `out`."""
    if kind not in TYPES:
        raise UserError(f"unknown GGUF type {kind!r}; choose one of: {', '.join(TYPES)}")
    folder = find_checkpoint(path)
    out = Path(out)
    if out.exists() and not force:
        raise UserError(f"{out} exists; pass --force to overwrite it")
    if not out.parent.is_dir():
        raise UserError(f"{out.parent} is not a folder")
    config = load_config(folder)
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        raise UserError(f"{folder}: no model.safetensors (sharded checkpoints are not supported)")
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN3, config.num_hidden_layers)
    temporary = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    writer = gguf.GGUFWriter(temporary, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.QWEN3])
    try:
        writer.add_name(run_name(folder))
        writer.add_context_length(config.max_position_embeddings)
        writer.add_embedding_length(config.hidden_size)
        writer.add_block_count(config.num_hidden_layers)
        writer.add_feed_forward_length(config.intermediate_size)
        writer.add_head_count(config.num_attention_heads)
        writer.add_head_count_kv(config.num_key_value_heads)
        writer.add_key_length(config.head_dim)  # need not be hidden_size / heads in Qwen3
        writer.add_value_length(config.head_dim)
        writer.add_rope_freq_base(config.rope_theta)
        writer.add_layer_norm_rms_eps(config.rms_norm_eps)
        writer.add_file_type(FILE_TYPES[kind])
        notes = write_tokenizer(writer, folder, config.vocab_size)
        with safe_open(weights, framework="pt") as source:
            plan = []  # (name, GGUF type) in file order: the header lists every tensor before any data
            for name in source.keys():
                if config.tie_word_embeddings and name == "lm_head.weight":
                    continue  # llama.cpp uses token_embd as the output matrix when output is absent
                target = names.get_name(name, try_suffixes=(".weight", ".bias"))
                if target is None:
                    raise UserError(f"{folder}: tensor {name} has no place in llama.cpp's qwen3 architecture")
                shape = tuple(source.get_slice(name).get_shape())
                stored_as = tensor_type(shape, kind)
                plan.append((name, stored_as))
                writer.add_tensor_info(target, shape, np.dtype(np.float32),
                                       int(np.prod(gguf.quant_shape_to_byte_shape(shape, stored_as))),
                                       raw_dtype=stored_as)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for name, stored_as in plan:
                writer.write_tensor_data(convert(source.get_tensor(name), stored_as))
        writer.flush()
        for handle in writer.fout or []:
            os.fsync(handle.fileno())
        writer.close()
        os.replace(temporary, out)
    finally:
        writer.close()
        temporary.unlink(missing_ok=True)
    for note in notes:
        log(f"note: {note}")
    return out


def write_modelfile(gguf_path: Path, stop_tokens: list[str]) -> Path:
    """An Ollama Modelfile beside the GGUF: `ollama create NAME -f Modelfile` imports it."""
    modelfile = gguf_path.with_name(f"{gguf_path.stem}.Modelfile")
    lines = [f"FROM ./{gguf_path.name}", f'TEMPLATE """{OLLAMA_TEMPLATE}"""']
    lines += [f'PARAMETER stop "{token}"' for token in stop_tokens]
    modelfile.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return modelfile
