"""The server fuzzed from its own OpenAPI document, and under load (both bounded, 127.0.0.1 only).

schemathesis reads /openapi.json of a live server and sends requests generated from it, valid and
invalid, checking every answer against the document (status codes, content types, schemas, the
Allow header of 405s, API-key enforcement) and that none is a server error. The load test is
`bench/serve_bench.py --load` shortened: 16 streaming clients for 10 s against a server whose
waiting line is smaller than the crowd.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from test_server import CORPUS, MODEL_NAME, ServerThread, make_checkpoint

from qwen3.config import ModelConfig
from qwen3.data.tokenizer import train_tokenizer
from qwen3.infer.engine import load_engine
from qwen3.model.checkpoint import save_model
from qwen3.model.decoder import Qwen3ForCausalLM
from qwen3.server.app import create_app

REPO = Path(__file__).resolve().parent.parent
SCHEMATHESIS = Path(sys.executable).with_name("schemathesis")


@pytest.mark.slow
def test_schemathesis_finds_nothing(tmp_path: Path) -> None:
    folder = make_checkpoint(tmp_path / "tiny")
    app = create_app(load_engine(folder), MODEL_NAME, api_key="fuzz")
    report, events = tmp_path / "report.json", tmp_path / "events.ndjson"
    with ServerThread(app) as server:
        run = subprocess.run(
            [str(SCHEMATHESIS), "run", f"{server.url}/openapi.json", "--checks", "all",
             # Requests the schema allows can still be refused: a prompt longer than the context
             # and unsupported options are 400s that no JSON Schema can express.
             "--exclude-checks", "positive_data_acceptance",
             "--header", "Authorization: Bearer fuzz", "--max-examples", "15", "--seed", "1",
             "--generation-database", "none", "--request-timeout", "60", "--no-color",
             "--report", "json,ndjson", "--report-json-path", str(report), "--report-ndjson-path", str(events)],
            capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-5000:] + run.stderr[-2000:]
    summary = json.loads(report.read_text())
    assert summary["failures"] == [] and summary["errors"] == [], summary
    statuses: Counter[int] = Counter()
    checks: Counter[str] = Counter()
    for line in events.read_text().splitlines():
        event = json.loads(line)
        if "ScenarioFinished" in event:
            recorder = event["ScenarioFinished"].get("recorder") or {}
            statuses.update(case["response"]["status_code"] for case in recorder.get("interactions", {}).values()
                            if case.get("response"))
            checks.update(check["status"] for results in recorder.get("checks", {}).values() for check in results)
    print(f"schemathesis: {summary['test_cases']['generated']} test cases, {sum(statuses.values())} requests "
          f"by status {dict(sorted(statuses.items()))}, {sum(checks.values())} checks {dict(checks)}")
    assert not [status for status in statuses if status >= 500]
    assert statuses[200] and statuses[400] and statuses[401], statuses  # it got through, and was refused
    assert set(checks) == {"success"}


@pytest.mark.slow
def test_load_with_a_full_queue_and_disconnects(tmp_path: Path) -> None:
    # Wider and longer than the tiny model, so a stream lasts long enough to be left mid-way.
    tokenizer = train_tokenizer(CORPUS, vocab_size=512)
    torch.manual_seed(0)
    save_model(Qwen3ForCausalLM(ModelConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=512,
        eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False)), tmp_path / "wide", tokenizer=tokenizer)
    figures_file = tmp_path / "load.json"
    # --max-batch 2: 2 rows and 8 waiting, fewer than the 16 clients, so the queue fills.
    run = subprocess.run([sys.executable, str(REPO / "bench" / "serve_bench.py"), "--load", "--clients", "16",
                          "--duration", "10", "--max-batch", "2", "--checkpoint", str(tmp_path / "wide"),
                          "--json", str(figures_file)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    figures = json.loads(figures_file.read_text())
    print(figures)
    statuses = {int(status): count for status, count in figures["statuses"].items()}
    assert set(statuses) <= {200, 429} and statuses.get(200) and statuses.get(429), statuses
    assert figures["429_without_retry_after"] == 0
    assert figures["problems"] == 0, figures["first_problems"]
    assert figures["dropped_mid_stream"] > 0
    assert figures["health_polls"] >= 20 and figures["health_p99_ms"] < 2000
    assert figures["rss_end_mb"] - figures["rss_start_mb"] < 50
    disconnect = figures["disconnect"]
    assert disconnect["running_while_open"] == disconnect["streams"] == 2
    assert disconnect["running_after_close"] == 0 and disconnect["cancelled"] == disconnect["streams"]
