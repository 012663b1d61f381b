"""bench/speedrun.py at a minuscule size: the race is run by the project's loop, the target is the
reference's final value, the candidate stops at the evaluation that reaches it, and the ablation
undoes exactly the changes it names."""

import json
import sys
from pathlib import Path

from qwen3.config import preset
from qwen3.data.sources import kjv_books

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import speedrun  # noqa: E402


def test_the_candidate_races_the_reference_to_its_final_bits_per_byte(tmp_path, monkeypatch, one_thread):
    monkeypatch.chdir(tmp_path)  # the token store's cache
    corpus = tmp_path / "genesis.txt"
    corpus.write_text("\n\n".join(kjv_books()[0].splitlines()[:400]), encoding="utf-8")
    speedrun.main(["--reference", "tiny", "--candidate", "tiny", "--set", "adamw_lr=1e-2", "--set", "max_steps=200",
                   "--data", f"{corpus}:doc=paragraph", "--seeds", "2", "--jobs", "2", "--evals", "10",
                   "--json", "race.json", "--plot", "race.png"])
    record = json.loads(Path("race.json").read_text())
    reference = [run for run in record["runs"] if run["recipe"] == "tiny"]
    candidates = [run for run in record["runs"] if run["recipe"] != "tiny"]
    assert [run["seed"] for run in reference] == [run["seed"] for run in candidates] == [0, 1]
    for ours, theirs in zip(reference, candidates):
        assert ours["curve"][-1]["step"] == 100  # the reference is trained to its end
        assert ours["target"] == theirs["target"] == ours["curve"][-1]["bits_per_byte"]
        seconds = [point["train_seconds"] for point in theirs["curve"]]
        assert seconds == sorted(seconds) and theirs["eval_seconds"] > 0
        values = [point["bits_per_byte"] for point in theirs["curve"]]
        # The higher learning rate gets there; it stops at the first evaluation that does.
        assert values[-1] <= theirs["target"] < min(values[:-1]) and len(values) < 10
        assert seconds[-2] < theirs["seconds_to_target"] <= seconds[-1]
    rows = {row["recipe"]: row for row in record["rows"]}
    assert rows["tiny"]["speedup"] == 1.0
    assert rows["tiny adamw_lr=1e-2 max_steps=200"]["speedup"] > 0
    assert Path("race.png").stat().st_size > 10_000


def test_each_ablation_sets_its_fields_back_to_the_reference_and_nothing_else():
    recipes = speedrun.recipes_to_race("seed", "speedrun", {"muon_lr": "0.03"}, ablate=True)
    seed_model, seed_train = preset("seed")
    seed_values = {**vars(seed_model), **vars(seed_train)}
    assert list(recipes)[:2] == ["seed", "speedrun muon_lr=0.03"]
    for change, names in speedrun.CHANGES.items():
        name, overrides = recipes[f"speedrun muon_lr=0.03 without {change}"]
        assert name == "speedrun"
        assert overrides == {"muon_lr": "0.03", **{field: seed_values[field] for field in names}}
    speedrun_model, speedrun_train = preset("speedrun")
    speedrun_values = {**vars(speedrun_model), **vars(speedrun_train)}
    for names in speedrun.CHANGES.values():  # every change is one the preset makes
        assert any(speedrun_values[field] != seed_values[field] for field in names), names
    changed = {field for field in seed_values if speedrun_values[field] != seed_values[field]}
    assert changed - {"out_dir"} <= {field for names in speedrun.CHANGES.values() for field in names}
