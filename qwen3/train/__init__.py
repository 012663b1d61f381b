"""Training: the one loop (loop.py) over its state (state.py), for every stage of stages/
(pretraining, chat fine-tuning); where a run starts (start.py), the optimizers and their schedule
(muon.py, schedule.py), one step across processes (parallel.py), the plan and its estimate
(plan.py), the held-out metrics (metrics.py) and `qwen3 eval` (evaluate.py), the run's record files
and `qwen3 compare` (runfiles.py, compare.py), samples (samples.py) and the chat scores of a
fine-tuned model (chat_scores.py).

It may import the foundation, model/ and data/, and infer/: the samples and the chat scores
generate with the inference engine. It never imports server/ or the command line
(tests/test_layers.py).
"""
