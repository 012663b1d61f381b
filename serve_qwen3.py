"""The seed's serving entry point: `python serve_qwen3.py` -> http://127.0.0.1:5000

Serves the default training run with the chat page and the OpenAI-compatible API: runs/seed-sft
when `qwen3 sft runs/seed` fine-tuned the seed run for chat, else runs/seed (as `python train_qwen3.py`
writes it); its best/ checkpoint. `qwen3 serve DIR` serves any other checkpoint, with options for
the host, port, API key and batch size.
"""

import sys


def main() -> None:
    from qwen3.errors import UserError
    from qwen3.infer.demo import default_chat_run
    from qwen3.server.app import serve

    run = default_chat_run()
    try:
        print(f"serving {run}", file=sys.stderr)
        serve(run, host="127.0.0.1", port=5000)
    except UserError as error:
        sys.exit(f"serve_qwen3.py: error: {error}")


if __name__ == "__main__":
    main()
