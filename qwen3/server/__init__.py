"""The HTTP server: an OpenAI-compatible API and a web chat page (`qwen3 serve`).

`app.create_app` builds the FastAPI app around a model and tokenizer; `app.serve` loads a checkpoint
and runs it on uvicorn; `scheduler.Scheduler` batches every request onto the model.
"""
