"""LoRA against full fine-tuning at the qwen3-0.6b shape: peak memory and step time, side by side.

Random weights (the shape is what matters), short sequences, a few steps of the training loop's own
pieces: the model plus its sliced loss (qwen3.model.loss.CausalLMLoss), AdamW as `qwen3 sft` builds
it, gradient clipping, and for LoRA peft's adapters injected as `--lora-rank` does
(qwen3.model.lora.add_lora, every projection, rank 16). Each case runs in its own process, so each peak is
its own: on a GPU torch.cuda.max_memory_allocated, on the CPU the peak RSS minus the RSS before the
model was built. Prints both rows and the ratios.

    python bench/lora_vs_full.py [--steps 3] [--batch 1] [--seq 64] [--rank 16] [--device cpu|cuda] [--layers N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time


def measure(args: argparse.Namespace) -> dict[str, float]:
    import torch
    from train_throughput import training_step

    from qwen3.config import LORA_PROJECTIONS, preset
    from qwen3.model.decoder import Qwen3ForCausalLM
    from qwen3.model.lora import add_lora
    from qwen3.model.loss import CausalLMLoss
    from qwen3.runtime import peak_rss_mb, synchronize
    from qwen3.train.muon import build_optimizers

    device = torch.device(args.device)
    rss_before = peak_rss_mb() * 2**20
    model_config, _ = preset("qwen3-0.6b")
    if args.layers:
        model_config.num_hidden_layers = args.layers
    torch.manual_seed(0)
    with device:
        model = Qwen3ForCausalLM(model_config)
    if args.case == "lora":
        model = add_lora(model, args.rank, 2.0 * args.rank, LORA_PROJECTIONS)
    optimizers = build_optimizers(model, "adamw", adamw_lr=1e-4)
    step_model = CausalLMLoss(model)
    params = [p for p in model.parameters() if p.requires_grad]
    x = torch.randint(0, model_config.vocab_size, (args.batch, args.seq + 1), device=device)
    times = []
    for _ in range(args.steps + 1):  # the first step (allocations, optimizer state) is not timed
        start = time.perf_counter()
        training_step(step_model, optimizers, params, x[:, :-1], x[:, 1:], torch.bfloat16, device)
        synchronize(device)
        times.append(time.perf_counter() - start)
    peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
            else peak_rss_mb() * 2**20 - rss_before)
    return {"case": args.case, "parameters": sum(p.numel() for p in model.parameters()),
            "trainable": sum(p.numel() for p in params), "peak_gib": peak / 2**30,
            "step_s": statistics.median(times[1:])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--layers", type=int, default=0, help="fewer decoder layers than the shape's 28")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--case", choices=["full", "lora"], help=argparse.SUPPRESS)  # one child process
    args = parser.parse_args()
    if args.case:
        print(json.dumps(measure(args)))
        return
    rows = {}
    for case in ("full", "lora"):
        child = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--case", case],
                               capture_output=True, text=True, check=True)
        rows[case] = json.loads(child.stdout.strip().splitlines()[-1])
        row = rows[case]
        print(f"{case:>4}: {row['trainable']:>13,} of {row['parameters']:,} parameters trained | "
              f"peak {row['peak_gib']:.2f} GiB | {row['step_s']:.2f} s/step", flush=True)
    full, lora = rows["full"], rows["lora"]
    print(f"LoRA/full: memory {lora['peak_gib'] / full['peak_gib']:.2f}x, "
          f"step time {lora['step_s'] / full['step_s']:.2f}x "
          f"(batch {args.batch} x {args.seq} tokens, rank {args.rank}, {args.device})")


if __name__ == "__main__":
    main()
