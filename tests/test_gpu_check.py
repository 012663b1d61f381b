"""bench/gpu_check.py in its reduced mode, on whatever device this machine has: the script run on
a GPU when one is at hand must not rot in between. Every section runs end to end and reports figures."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_the_gpu_check_runs_every_section_in_reduced_mode(tmp_path):
    out = tmp_path / "check.json"
    completed = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--reduced", "--json", str(out)],
                               capture_output=True, text=True, timeout=1500, cwd=tmp_path)
    assert completed.returncode == 0, completed.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    cases = {(row["section"], row["case"]) for row in rows}
    assert {section for section, _ in cases} == {"train", "loop", "decode", "serve"}
    assert {case for section, case in cases if section == "train"} == {
        "tiny 2x64, ours", "tiny 2x64, ours compiled", "tiny 2x64, transformers"}
    assert all(row["tok_s"] > 0 for row in rows)
    assert all(0 < row["mfu"] < 1 and row["memory_gb"] > 0 for row in rows if row["section"] == "train")
    # The compiled step trains the same model: its loss after the same steps equals the eager one's.
    losses = {row["case"]: float(row["note"].split()[-1]) for row in rows if row["section"] == "train"}
    assert losses["tiny 2x64, ours compiled"] == pytest.approx(losses["tiny 2x64, ours"], abs=1e-2)
    assert {row["case"] for row in rows if row["section"] == "decode"} == {
        f"batch {b}, {name}" for b in (1, 4) for name in ("ours", "ours compiled", "transformers")}
    (serve,) = [row for row in rows if row["section"] == "serve"]
    assert "all 200" in serve["note"]
    assert "section case" in " ".join(completed.stdout.split())  # the table was printed
