"""Weights in fewer bytes for CPU decoding: int8 and int4 linear layers on PyTorch's own kernels.

Why: decoding one token reads every weight once, so at real shapes a step takes as long as its
weights' bytes take to stream from memory (Qwen3-0.6B: 2.4 GB in float32, 1.2 GB in bfloat16,
0.6 GB in int8, 0.3 GB in int4). Each width keeps the model's numbers where they matter (the
embedding, the norms, attention and its cache stay in the model's dtype) and replaces every
nn.Linear, the LM head included:

  Int8Linear  int8 weights, one scale per output channel; each input row is quantized to int8 with
              a scale of its own (per token, as llama.cpp's q8_0 quantizes its inputs per block), and
              the product is fbgemm's int8 GEMM (AVX512-VNNI where the CPU has it) into int32,
              rescaled to float.
  Int4Linear  int4 weights in groups of 32 along the input, each group with a scale and an offset
              (q4_1's format; q4_0 has a scale only), multiplied by `_weight_int4pack_mm_for_cpu`,
              which unpacks them inside its GEMM; its inputs are bfloat16.
  quantize    the model with every nn.Linear replaced, in place.
  chunked_perplexity  the held-out measure each width is checked with (llama-perplexity's).

Both are batch invariant: a row's output depends on that row only (each row has its own input
scale; integer products are exact; the int4 kernel treats rows alike), so a prompt decodes the same
tokens alone or in a batch. Both are for inference: their state cannot be saved as a checkpoint
(`state_dict` raises), so a quantized model is never written as a Hugging Face folder by mistake;
quantize the float checkpoint again at load time instead (`load_engine(..., quantize="int8")`).

The int8 product goes through a custom op (`qwen3::int8_linear`): torch.compile cannot trace
fbgemm's packed weights (a TorchScript object), so the op is opaque to it and the compiled step
calls the kernel as one extern call, keeping the rest of the step fused.
"""

from __future__ import annotations

import itertools
import math
import warnings
import weakref

import torch
from torch import nn

from qwen3.errors import UserError

KINDS = ("int8", "int4")
INT4_GROUP = 32  # input columns that share one int4 scale and offset: q4_0's and q4_1's block


class Inference(nn.Module):
    """A layer whose weights exist for inference only: asking for its state is an error."""

    def __init__(self) -> None:
        super().__init__()
        self.register_state_dict_pre_hook(refuse_state_dict)


def refuse_state_dict(module: nn.Module, prefix: str, keep_vars: bool) -> None:
    raise UserError("a quantized model is for inference only and cannot be saved; save the float model, "
                    "and quantize it when loading (--quantize)")


# fbgemm's packed weights, by layer, for the custom op below (a compiled graph passes the key).
PACKED: dict[int, torch.ScriptObject] = {}
KEYS = itertools.count()


def input_levels() -> int:
    """The largest |q| of an int8 input. fbgemm multiplies unsigned inputs (q + zero point) by signed
    weights; without VNNI it adds pairs of those products in 16 bits, which 255 * 127 * 2 overflows,
    so there the inputs keep 7 bits (63), as torch.ao's `reduce_range` does."""
    return 127 if torch.cpu._is_vnni_supported() else 63


@torch.library.custom_op("qwen3::int8_linear", mutates_args=())
def int8_linear(x: torch.Tensor, key: int, levels: int, out_features: int) -> torch.Tensor:
    """x (M, K) float32, each row within [-1, 1] -> x @ W^T (M, N): x is quantized with the fixed
    scale 1 / levels (zero point levels + 1), so each row's integers depend on that row only."""
    return torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(
        x, 1.0 / levels, levels + 1, PACKED[key])


@int8_linear.register_fake
def _(x: torch.Tensor, key: int, levels: int, out_features: int) -> torch.Tensor:
    return x.new_empty(x.shape[0], out_features)


class Int8Linear(Inference):
    """y = x W^T with W int8 (scale per output channel) and x int8 per row (scale per row).

    Row i is divided by its largest magnitude a_i, quantized to integers in [-levels, levels],
    multiplied by the int8 weights into exact int32 sums, rescaled by the weights' scales
    (in the kernel) and by a_i (here)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        weight = linear.weight.detach().float()
        scales = weight.abs().amax(dim=1).clamp(min=1e-12) / 127  # (N,)
        with warnings.catch_warnings():  # quantized tensors are deprecated; fbgemm's packing takes them in torch 2.13
            warnings.simplefilter("ignore", UserWarning)
            qweight = torch.quantize_per_channel(weight, scales.double(), torch.zeros_like(scales, dtype=torch.long),
                                                 axis=0, dtype=torch.qint8)
        self.out_features, self.in_features = weight.shape
        self.levels = input_levels()
        self.key = next(KEYS)
        PACKED[self.key] = torch.ops.quantized.linear_prepack(qweight, None)
        # Freed with this layer; copies that torch.compile makes share the key and leave it be.
        weakref.finalize(self, PACKED.pop, self.key, None)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().float(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape, dtype = x.shape, x.dtype
        x = x.reshape(-1, self.in_features).float()
        magnitude = x.abs().amax(dim=1, keepdim=True).clamp(min=1e-12)  # a_i, (M, 1)
        y = int8_linear(x / magnitude, self.key, self.levels, self.out_features) * magnitude
        if self.bias is not None:
            y = y + self.bias
        return y.to(dtype).reshape(*shape[:-1], self.out_features)


class Int4Linear(Inference):
    """y = x W^T with W in int4 groups: w = (q - 8) * scale + offset, q in 0..15, one scale and
    offset per `group` inputs of an output (the kernel's layout: (K / group, N, 2), bfloat16)."""

    def __init__(self, linear: nn.Linear, group: int = INT4_GROUP) -> None:
        super().__init__()
        weight = linear.weight.detach().float()
        self.out_features, self.in_features = weight.shape
        self.group = group
        # The kernel takes outputs in tiles of 16: a vocabulary of another size gets zero rows, cut off
        # after the product.
        weight = torch.nn.functional.pad(weight, (0, 0, 0, -self.out_features % 16))
        groups = weight.view(weight.shape[0], -1, group)  # (N, K / group, group)
        low, high = groups.amin(dim=-1), groups.amax(dim=-1)
        scale = ((high - low) / 15).clamp(min=1e-12)
        q = ((groups - low[..., None]) / scale[..., None]).round().clamp(0, 15).to(torch.int32)
        offset = low + 8 * scale  # so that (q - 8) * scale + offset = low + q * scale
        self.register_buffer("packed", torch._convert_weight_to_int4pack_for_cpu(q.view_as(weight), 1))
        self.register_buffer("scale_offset", torch.stack([scale, offset], dim=-1).transpose(0, 1)
                             .contiguous().to(torch.bfloat16))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().float(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape, dtype = x.shape, x.dtype
        x = x.reshape(-1, self.in_features).to(torch.bfloat16).contiguous()  # the kernel reads rows densely
        y = torch._weight_int4pack_mm_for_cpu(x, self.packed, self.group, self.scale_offset)
        y = y[:, :self.out_features].to(dtype)
        if self.bias is not None:
            y = y + self.bias.to(dtype)
        return y.reshape(*shape[:-1], self.out_features)


def check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise UserError(f"unknown quantization {kind!r} (supported: {', '.join(KINDS)})")


def quantize(model: nn.Module, kind: str) -> nn.Module:
    """Replace every nn.Linear of `model` (on the CPU) by its `kind` ("int8" or "int4") version, in
    place; a tied LM head gets its own quantized copy, the embedding stays as it is."""
    check_kind(kind)
    if any(p.device.type != "cpu" for p in model.parameters()):
        raise UserError(f"--quantize {kind} is for CPU inference; use --device cpu")
    if kind == "int8" and torch.backends.quantized.engine not in ("x86", "fbgemm"):
        raise UserError(f"--quantize int8 needs fbgemm (x86 CPUs); this CPU's engine is "
                        f"{torch.backends.quantized.engine}: use --quantize int4")
    linears = [(name, module) for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if kind == "int4":
        odd = [name for name, module in linears if module.in_features % INT4_GROUP]
        if odd:
            raise UserError(f"--quantize int4 needs input sizes that are multiples of {INT4_GROUP}; "
                            f"{odd[0]} has {dict(linears)[odd[0]].in_features}")
    layer = Int8Linear if kind == "int8" else Int4Linear
    for name, module in linears:
        parent, _, attribute = name.rpartition(".")
        with torch.no_grad():
            setattr(model.get_submodule(parent), attribute, layer(module))
    return model


def chunked_perplexity(model: nn.Module, ids: list[int], context: int) -> float:
    """Perplexity as llama-perplexity measures it, so that each width's quality can be set beside
    llama.cpp's: chunks of `context` tokens, each scoring its second half."""
    first, nll, count = context // 2, 0.0, 0
    with torch.inference_mode():
        for start in range(0, len(ids) // context * context, context):
            chunk = torch.tensor([ids[start:start + context]])
            logits = model(chunk)[0, first:context - 1].double()
            nll += torch.nn.functional.cross_entropy(logits, chunk[0, first + 1:], reduction="sum").item()
            count += context - first - 1
    return math.exp(nll / count)

