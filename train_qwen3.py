"""The seed's entry point, kept: train the seed recipe, then show what the model writes.

    python train_qwen3.py               train runs/seed (continuing it if it was interrupted), then the demo
    python train_qwen3.py demo          the five demo prompts against runs/seed
    python train_qwen3.py interactive   chat with runs/seed-sft when `qwen3 sft runs/seed` made it, else runs/seed

The recipe is the seed's with its steps counted honestly: 8 windows x 2 accumulation = 16 windows of
256 tokens per optimizer step, 500 optimizer steps, linear warmup then cosine decay, Muon (lr 0.01)
on the hidden matrices and AdamW on the rest, an 8192-token BPE trained on the default corpus (the
King James Bible). Everything else, and any other configuration, is `qwen3 train` (docs/training.md).
"""

from __future__ import annotations

import sys
import time

from qwen3.errors import UserError

USAGE = "usage: python train_qwen3.py [demo|interactive]"
# The seed's reported result (its README), for comparison with a fresh run.
SEED_RESULT = "seed: val loss 4.49 | accuracy 31.85% | perplexity 89.06 | 20.3 min (250 real optimizer steps)"


def train_seed() -> bool:
    """Train (or continue) runs/seed with the seed preset; False when interrupted."""
    from pathlib import Path

    from qwen3.config import preset
    from qwen3.train.loop import train
    from qwen3.train.start import resume_configs, unfinished_run

    model_config, train_config = preset("seed")
    out = Path(train_config.out_dir)
    unfinished = unfinished_run(out)
    if unfinished:
        print(f"continuing the interrupted run in {out} from step {unfinished[0]} of {unfinished[1]}",
              file=sys.stderr)
        model_config, train_config = resume_configs(out)
    start = time.perf_counter()
    result = train(model_config, train_config, resume=bool(unfinished))
    if result.interrupted:
        return False
    minutes = (time.perf_counter() - start) / 60
    print(f"\ntrained {result.step} optimizer steps ({result.tokens:,} tokens) in {minutes:.1f} min "
          f"(this session; whole run {result.elapsed_s / 60:.1f} min)")
    if result.final_eval is not None:
        print(f"ours: validation {result.final_eval.summary()}")
    print(SEED_RESULT)
    print(f"checkpoints: {out / 'best'} and {out / 'last'}; curves: {out / 'loss.png'}\n")
    return True


def main(argv: list[str]) -> int:
    command = argv[0] if argv else "train"
    if command not in ("train", "demo", "interactive") or len(argv) > 1:
        print(USAGE, file=sys.stderr)
        return 2
    try:
        from qwen3.infer.chat import run_chat
        from qwen3.infer.demo import DEFAULT_RUN, default_chat_run, run_demo

        if command == "train":
            if not train_seed():
                return 130
            run_demo(DEFAULT_RUN)
        elif command == "demo":
            run_demo(DEFAULT_RUN)
        else:
            run = default_chat_run()
            print(f"chatting with {run}", file=sys.stderr)
            run_chat(run)
    except UserError as error:
        print(f"train_qwen3.py: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
