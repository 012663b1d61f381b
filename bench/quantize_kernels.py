"""Which kernel each weight width should use: PyTorch's candidates on Qwen3-0.6B's matrices, side by side.

Every linear layer of one decode step of Qwen3-0.6B (28 layers of q, k, v, o, gate, up and down,
then the 151,936 x 1024 LM head: 596M weights, more than any cache holds, so each step streams them
from memory as a real step does), run eagerly for M rows (1: a decode step at batch 1; 8: batch 8),
each candidate in turn in one process, median of --repeats passes:

  float32 / bfloat16   F.linear
  int8 fbgemm          int8 weights per output channel, inputs int8 per row, fbgemm's GEMM (Int8Linear)
  int8 _int_mm         the same numbers through torch._int_mm (oneDNN)
  int8 int8pack        torch._weight_int8pack_mm: int8 weights, bfloat16 inputs (weight-only)
  int4 g32 / g128      torch._weight_int4pack_mm_for_cpu, bfloat16 inputs (Int4Linear: g32)

    python bench/quantize_kernels.py [--rows 1,8] [--threads 1] [--repeats 5]
"""

from __future__ import annotations

import argparse
import gc
from collections.abc import Callable

import torch
from llamacpp_bench import median_seconds
from torch import nn

from qwen3.config import preset
from qwen3.infer.quantize import Int4Linear, Int8Linear

Kernel = Callable[[torch.Tensor], torch.Tensor]


def shapes() -> list[tuple[int, int]]:
    """(out, in) of every linear layer of a Qwen3-0.6B decode step, the LM head last."""
    c = preset("qwen3-0.6b")[0]
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    layer = [(q, c.hidden_size), (kv, c.hidden_size), (kv, c.hidden_size), (c.hidden_size, q),
             (c.intermediate_size, c.hidden_size), (c.intermediate_size, c.hidden_size),
             (c.hidden_size, c.intermediate_size)]
    return layer * c.num_hidden_layers + [(c.vocab_size, c.hidden_size)]


def int_mm(weight: torch.Tensor) -> Kernel:
    scales = weight.abs().amax(dim=1) / 127
    qweight = (weight / scales[:, None]).round().to(torch.int8).t()

    def run(x: torch.Tensor) -> torch.Tensor:
        magnitude = x.abs().amax(dim=1, keepdim=True) / 127
        return torch._int_mm((x / magnitude).round().to(torch.int8), qweight).float() * magnitude * scales
    return run


def int8pack(weight: torch.Tensor) -> Kernel:
    scales = weight.abs().amax(dim=1) / 127
    qweight = (weight / scales[:, None]).round().to(torch.int8)
    return lambda x: torch._weight_int8pack_mm(x.to(torch.bfloat16), qweight, scales.to(torch.bfloat16))


def linear(weight: torch.Tensor) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    layer.weight.data = weight
    return layer


CANDIDATES: dict[str, Callable[[torch.Tensor], Kernel]] = {
    "float32": lambda w: lambda x: torch.nn.functional.linear(x, w),
    "bfloat16": lambda w: (lambda b: lambda x: torch.nn.functional.linear(x.to(torch.bfloat16), b))(w.bfloat16()),
    "int8 fbgemm (used)": lambda w: Int8Linear(linear(w)),
    "int8 _int_mm": int_mm,
    "int8 int8pack": int8pack,
    "int4 g32 (used)": lambda w: Int4Linear(linear(w), 32),
    "int4 g128": lambda w: Int4Linear(linear(w), 128),
}


def step_seconds(kernels: list[Kernel], inputs: dict[int, torch.Tensor], repeats: int) -> float:
    def step() -> None:
        for kernel, (_, size) in zip(kernels, shapes()):
            kernel(inputs[size])
    step()
    return median_seconds(step, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1,8")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = [int(r) for r in args.rows.split(",")]
    print(f"Qwen3-0.6B's {len(shapes())} linear layers per step, {args.threads} threads, median of {args.repeats}; "
          f"torch {torch.__version__}\n  {'':22}" + "".join(f"{f'ms, {m} rows':>16}" for m in rows))
    generator = torch.Generator().manual_seed(0)
    for name, make in CANDIDATES.items():
        with torch.inference_mode():
            kernels = [make(torch.randn(out, size, generator=generator) * 0.02) for out, size in shapes()]
            times = []
            for m in rows:
                inputs = {size: torch.randn(m, size, generator=generator) for size in {s for _, s in shapes()}}
                times.append(step_seconds(kernels, inputs, args.repeats))
        print(f"  {name:22}" + "".join(f"{1e3 * t:16.1f}" for t in times), flush=True)
        del kernels
        gc.collect()


if __name__ == "__main__":
    main()
