"""The HTTP server: an OpenAI-compatible API and a web chat page (`qwen3 serve`).

`app.create_app` builds the FastAPI app around an inference `Engine`; `app.serve` loads a checkpoint
into one and runs the app on uvicorn; `scheduler.Scheduler` batches every request onto that engine;
`service.CompletionService` turns requests into jobs and answers.

It may import the foundation, model/, data/ and infer/; it never touches training
(tests/test_layers.py).
"""
