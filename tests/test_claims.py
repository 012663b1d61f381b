"""bench/claims.py at a minuscule size, so the script behind the docs' numbers cannot rot.

Every claim runs end to end (training, timing, plots, JSON) on a synthetic token stream in seconds;
the asserts check what must hold whatever the size: the KV cache shrinks exactly by heads/kv_heads,
tying saves exactly vocab x hidden parameters, the GELU MLP has SwiGLU's parameter count, and
a learned position table is never evaluated past its length.
"""

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from qwen3.model import RMSNorm

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("claims", ROOT / "bench" / "claims.py")
claims = sys.modules["claims"] = importlib.util.module_from_spec(spec)  # dataclasses look it up
spec.loader.exec_module(claims)

TINY = claims.Settings(
    vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4, num_kv_heads=2,
    head_dim=8, seq_len=8, extrapolate=(1, 2), batch_size=4, steps=12, warmup=3, lr=1e-2, lrs=(1e-2, 3e-2),
    seeds=(0, 1), norm_shapes=((16, 32),), timing_repeats=2,
    decode_hidden=32, decode_layers=1, decode_heads=4, decode_head_dim=8, decode_kv_heads=(1, 4),
    decode_batches=(1, 2), decode_context=8, decode_steps=2)


def synthetic_tokens(length: int, seed: int) -> np.ndarray:
    """A learnable stream: runs of counting up from a random start (token t is followed by t + 1)."""
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, TINY.vocab_size, size=length // 16 + 1)
    return ((starts[:, None] + np.arange(16)) % TINY.vocab_size).ravel()[:length].astype(np.uint16)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("claims")
    return out, claims.run_claims(list(claims.CLAIMS), TINY, synthetic_tokens(4000, 0),
                                  synthetic_tokens(400, 1), out, "test")


def test_every_claim_writes_its_plot_and_json(results):
    out, written = results
    assert json.loads((out / "claims.json").read_text()) == json.loads(json.dumps(written))
    for claim in claims.CLAIMS:
        assert (out / f"claims_{claim}.png").stat().st_size > 1000
        assert written[claim]["settings"]["steps"] == TINY.steps


def test_training_learns_and_differences_are_paired_by_seed(results):
    loss = results[1]["swiglu"]["loss"]
    for entry in loss["variants"].values():
        assert all(0 < v < math.log(TINY.vocab_size) for v in entry["val_loss"])
    base = next(e for e in loss["variants"].values() if e["variant"] == "baseline")["val_loss"]
    for entry in loss["variants"].values():
        assert entry["minus_baseline"] == pytest.approx([v - b for v, b in zip(entry["val_loss"], base)])
    assert loss["baseline_spread"] >= 0


def test_gqa_cache_shrinks_by_heads_over_kv_heads(results):
    gqa = results[1]["gqa"]
    for rows in gqa["memory"].values():
        for row in rows:
            assert row["kv_cache_vs_mha"] == pytest.approx(row["kv_heads"] / row["heads"])
            assert row["attention_parameters_vs_mha"] < 1 or row["kv_heads"] == row["heads"]
    assert all(r["tokens_per_s"] > 0 for r in gqa["decode"])


def test_norm_timings_are_positive(results):
    for row in results[1]["norm"]["timing"]:
        assert 0 < row["forward_us"] and 0 < row["forward_backward_us"]


def test_lr_sensitivity_reuses_the_main_runs(results):
    norm = results[1]["norm"]
    for label, entry in norm["lr_sensitivity"]["variants"].items():
        assert entry["lr"] == list(TINY.lrs)
        assert entry["val_loss"][0] == norm["loss"]["variants"][label]["val_loss"][0]  # lr == TINY.lr


def test_rope_extrapolation_stops_at_a_learned_table(results):
    curves = results[1]["rope"]["extrapolation"]
    longest = TINY.seq_len * max(TINY.extrapolate)
    assert len(curves["RoPE (ours)"]["position_loss"]) == longest
    assert len(curves["learned absolute"]["position_loss"]) == TINY.seq_len
    assert list(curves["learned absolute"]["ppl_at_length"]) == [str(TINY.seq_len)]
    assert list(curves["learned absolute"]["segment_loss_per_seed"]) == [f"1-{TINY.seq_len}"]
    nope = curves["none (NoPE)"]
    assert list(nope["ppl_at_length"]) == [str(k * TINY.seq_len) for k in TINY.extrapolate]
    assert all(len(v) == len(TINY.seeds) for v in nope["segment_loss_per_seed"].values())


def test_tying_saves_vocab_times_hidden(results):
    for row in results[1]["tying"]["parameters"]:
        assert row["saved"] == row["vocab_size"] * 128  # the seed's hidden size


def test_variants_swap_what_they_say():
    torch.manual_seed(0)
    baseline = claims.build_variant("baseline", TINY)
    gelu = claims.build_variant("gelu", TINY)
    assert gelu.num_parameters() == baseline.num_parameters()
    layernorm = claims.build_variant("layernorm", TINY)
    assert not any(isinstance(m, RMSNorm) for m in layernorm.modules())
    nope = claims.build_variant("nope", TINY)
    # Without positions the last output depends on the set of earlier tokens, not on their order.
    x = torch.randint(0, TINY.vocab_size, (2, TINY.seq_len))
    swapped = torch.cat([x[:, 1:2], x[:, :1], x[:, 2:]], dim=1)
    assert torch.allclose(nope(x)[:, -1], nope(swapped)[:, -1], atol=1e-5)
    assert not torch.allclose(baseline(x)[:, -1], baseline(swapped)[:, -1], atol=1e-5)
    learned = claims.build_variant("learned_positions", TINY)
    assert not torch.allclose(learned(x)[:, -1], learned(swapped)[:, -1], atol=1e-5)
    with pytest.raises(ValueError):
        claims.build_variant("nonsense", TINY)


def test_newton_schulz_flattens_the_spectrum(results):
    muon = results[1]["muon"]
    for spectrum in muon["spectra"].values():
        assert spectrum["newton_schulz_stable_rank"] > spectrum["gradient_stable_rank"]
    low, high = muon["scalar_map"]["range_for_sigma_from_0_01"]
    assert 0.5 < low < 1 < high < 1.5
