"""What chat fine-tuning changed: held-out scores of the checkpoint it started from and of its result.

    python bench/sft_before_after.py BASE TUNED [--limit N] [--max-new-tokens N]

e.g. `python bench/sft_before_after.py runs/seed runs/seed-sft` after `qwen3 sft runs/seed`. Prints a
Markdown table: assistant-token loss, the share of greedy replies closed by the end-of-turn token
within max_new_tokens, and the book task's accuracy against its majority-class baseline, all on
the embedded set's held-out verses (qwen3/train/chat_scores.py).
"""

from __future__ import annotations

import argparse
import time

from qwen3.train.chat_scores import score_chat


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base")
    parser.add_argument("tuned")
    parser.add_argument("--limit", type=int, default=None, help="held-out conversations to score")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    print("| checkpoint | assistant-token loss | replies ending with end-of-turn | book named right "
          "| majority-class baseline |")
    print("|---|---|---|---|---|")
    for path in (args.base, args.tuned):
        start = time.perf_counter()
        scores = score_chat(path, args.device, args.max_new_tokens, args.limit)
        print(f"| {path} | {' | '.join(scores.row())} |  ({scores.replies} replies, "
              f"{time.perf_counter() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
