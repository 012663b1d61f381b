"""bench/claims.py and bench/claims_plot.py at a minuscule size, so the scripts behind the docs'
numbers cannot rot.

Every claim is measured end to end (variants trained by the project's loop on a few KB of the
embedded corpus, timings, JSON) in seconds, and every figure is then drawn from the JSON alone,
in a process that never imports torch. The asserts check what must hold whatever the size: the
KV cache shrinks exactly by heads/kv_heads, tying saves exactly vocab x hidden parameters, the GELU
MLP has SwiGLU's parameter count, and a learned position table is never evaluated past its length.
"""

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qwen3.config import ModelConfig
from qwen3.data.sources import kjv_books
from qwen3.model.decoder import RMSNorm
from qwen3.train.runfiles import RunFiles
from qwen3.train.stages.pretrain import Pretraining

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))  # the scripts import each other as their folder's modules
import claims  # noqa: E402
from claims_variants import VariantSource  # noqa: E402

DEFAULTS = claims.Settings()
TINY_MODEL = ModelConfig(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=16)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Settings of a few seconds, and their data: the first 300 verses of Genesis, one per document."""
    folder = tmp_path_factory.mktemp("claims")
    corpus = folder / "genesis.txt"
    corpus.write_text("\n".join(kjv_books()[0].splitlines()[:300]) + "\n", encoding="utf-8")
    train = dataclasses.replace(DEFAULTS.train, data=[f"{corpus}:doc=line"], cache_dir=str(folder / "cache"),
                                tokenizer_vocab_size=TINY_MODEL.vocab_size, seq_len=8, batch_size=4,
                                max_steps=12, eval_interval=12, warmup_steps=3, adamw_lr=1e-2, peak_flops=1e11)
    settings = claims.Settings(
        model=TINY_MODEL, train=train, extrapolate=(1, 2), lrs=(1e-2, 3e-2), seeds=(0, 1),
        norm_shapes=((16, 32),), timing_repeats=2, decode_kv_heads=(1, 4), decode_batches=(1, 2),
        decode=dataclasses.replace(TINY_MODEL, num_key_value_heads=4, max_position_embeddings=10),
        decode_context=8, decode_steps=2)
    data = Pretraining.prepare(train, train.tokenizer, settings.model.max_position_embeddings).data
    return settings, data, folder


@pytest.fixture(scope="module")
def measured(tiny, one_thread):
    settings, data, folder = tiny
    runs = claims.Runs(settings, data)
    json_path = folder / "claims.json"
    with pytest.MonkeyPatch.context() as patch:
        # Each run's own loss.png (the loop's record, tested in test_train) is most of the time here.
        patch.setattr(RunFiles, "plot", lambda self: None)
        return json_path, claims.run_claims(list(claims.CLAIMS), runs, json_path, "test"), runs


def test_every_claim_writes_its_json_entry(measured):
    json_path, written, _ = measured
    assert json.loads(json_path.read_text()) == json.loads(json.dumps(written))
    for claim in claims.CLAIMS:
        assert written[claim]["settings"]["train"]["max_steps"] == 12


def test_the_figures_redraw_from_the_json_alone(measured, tmp_path):
    """claims_plot.py in a fresh process, from a copy of the JSON: it never imports torch, so it
    cannot have trained anything."""
    copy = tmp_path / "claims.json"
    copy.write_text(measured[0].read_text())
    script = ROOT / "bench" / "claims_plot.py"
    code = (f"import runpy, sys; sys.argv = ['claims_plot.py', '--json', {str(copy)!r}]; "
            f"runpy.run_path({str(script)!r}, run_name='__main__'); "
            f"assert 'torch' not in sys.modules, 'plotting imported torch'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path, timeout=120)
    for claim in claims.CLAIMS:
        assert (tmp_path / f"claims_{claim}.png").stat().st_size > 1000


def test_training_learns_and_differences_are_paired_by_seed(measured, tiny):
    loss = measured[1]["swiglu"]["loss"]
    vocab = tiny[1].tokenizer.vocab_size
    for entry in loss["variants"].values():
        assert all(0 < v < math.log(vocab) for v in entry["val_loss"])
        assert [len(curve) for curve in entry["train_loss"]] == [12, 12]  # every step, every seed
    base = next(e for e in loss["variants"].values() if e["variant"] == "baseline")["val_loss"]
    for entry in loss["variants"].values():
        assert entry["minus_baseline"] == pytest.approx([v - b for v, b in zip(entry["val_loss"], base)])
    assert loss["baseline_spread"] >= 0


def test_the_loop_trains_the_variant_it_was_given(measured):
    runs = measured[2]
    assert not any(isinstance(m, RMSNorm) for m in runs.get("layernorm", 0).model.modules())
    assert isinstance(runs.get("post_norm", 0).model.model.norm, torch.nn.Identity)
    assert runs.get("full_mha", 0).model.config.num_key_value_heads == TINY_MODEL.num_attention_heads
    # The seed fixes the initial weights and the batches: the first step's loss (before any update)
    # is the same at another learning rate, and not at another seed.
    first = runs.get("baseline", 0).train_loss[0]
    assert runs.get("baseline", 0, 3e-2).train_loss[0] == first != runs.get("baseline", 1).train_loss[0]


def test_gqa_cache_shrinks_by_heads_over_kv_heads(measured):
    gqa = measured[1]["gqa"]
    for rows in gqa["memory"].values():
        for row in rows:
            assert row["kv_cache_vs_mha"] == pytest.approx(row["kv_heads"] / row["heads"])
            assert row["attention_parameters_vs_mha"] < 1 or row["kv_heads"] == row["heads"]
    assert all(r["tokens_per_s"] > 0 for r in gqa["decode"])


def test_norm_timings_are_positive(measured):
    for row in measured[1]["norm"]["timing"]:
        assert 0 < row["forward_us"] and 0 < row["forward_backward_us"]


def test_lr_sensitivity_reuses_the_main_runs(measured, tiny):
    norm = measured[1]["norm"]
    for label, entry in norm["lr_sensitivity"]["variants"].items():
        assert entry["lr"] == list(tiny[0].lrs)
        assert entry["val_loss"][0] == norm["loss"]["variants"][label]["val_loss"][0]  # lr == adamw_lr


def test_rope_extrapolation_stops_at_a_learned_table(measured, tiny):
    settings = tiny[0]
    seq_len = settings.train.seq_len
    curves = measured[1]["rope"]["extrapolation"]
    assert len(curves["RoPE (ours)"]["position_loss"]) == seq_len * max(settings.extrapolate)
    assert len(curves["learned absolute"]["position_loss"]) == seq_len
    assert list(curves["learned absolute"]["ppl_at_length"]) == [str(seq_len)]
    assert list(curves["learned absolute"]["segment_loss_per_seed"]) == [f"1-{seq_len}"]
    nope = curves["none (NoPE)"]
    assert list(nope["ppl_at_length"]) == [str(k * seq_len) for k in settings.extrapolate]
    assert all(len(v) == len(settings.seeds) for v in nope["segment_loss_per_seed"].values())


def test_tying_saves_vocab_times_hidden(measured):
    for row in measured[1]["tying"]["parameters"]:
        assert row["saved"] == row["vocab_size"] * 128  # the seed's hidden size


def test_variants_swap_what_they_say(tiny):
    tokenizer, cpu = tiny[1].tokenizer, torch.device("cpu")

    def build(variant: str):
        torch.manual_seed(0)
        return VariantSource(variant=variant, seq_len=8).build(TINY_MODEL, tokenizer, cpu)

    baseline = build("baseline")
    gelu = build("gelu")
    assert gelu.num_parameters() == baseline.num_parameters()
    # The swapped module is initialized after the shared ones: those start equal under one seed.
    for name in ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight"):
        assert torch.equal(gelu.get_parameter(name), baseline.get_parameter(name))
    assert not any(isinstance(m, RMSNorm) for m in build("layernorm").modules())
    nope = build("nope")
    # Without positions the last output depends on the set of earlier tokens, not on their order.
    x = torch.randint(0, tokenizer.vocab_size, (2, 8))
    swapped = torch.cat([x[:, 1:2], x[:, :1], x[:, 2:]], dim=1)
    assert torch.allclose(nope(x)[:, -1], nope(swapped)[:, -1], atol=1e-5)
    assert not torch.allclose(baseline(x)[:, -1], baseline(swapped)[:, -1], atol=1e-5)
    learned = build("learned_positions")
    assert not torch.allclose(learned(x)[:, -1], learned(swapped)[:, -1], atol=1e-5)
    with pytest.raises(ValueError):
        VariantSource(variant="nonsense")


def test_newton_schulz_flattens_the_spectrum(measured):
    muon = measured[1]["muon"]
    for spectrum in muon["spectra"].values():
        assert spectrum["newton_schulz_stable_rank"] > spectrum["gradient_stable_rank"]
    low, high = muon["scalar_map"]["range_for_sigma_from_0_01"]
    assert 0.5 < low < 1 < high < 1.5
