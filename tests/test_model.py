"""Our Qwen3 against transformers' Qwen3ForCausalLM on the same weights, and the KV cache against a full pass."""

import pytest
import torch
from transformers import Qwen3Config
from transformers import Qwen3ForCausalLM as ReferenceQwen3

from qwen3.config import ModelConfig, preset
from qwen3.model.decoder import Qwen3ForCausalLM

SHAPES = {
    "gqa": dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16),
    "head_dim_not_hidden_over_heads": dict(num_attention_heads=4, num_key_value_heads=2, head_dim=24),
    "one_kv_head": dict(num_attention_heads=4, num_key_value_heads=1, head_dim=16),
    "kv_heads_equal_heads": dict(num_attention_heads=4, num_key_value_heads=4, head_dim=16),
    "untied": dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=False),
    "rope_theta_1e6": dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16, rope_theta=1e6),
    "attention_bias": dict(num_attention_heads=2, num_key_value_heads=1, head_dim=32, attention_bias=True),
}


def small_config(**overrides) -> ModelConfig:
    values = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  max_position_embeddings=128, eos_token_id=0)
    values.update(overrides)
    return ModelConfig(**values)


def randomize_norms(model: torch.nn.Module) -> None:
    """Norm gains start at 1; make them random so a swapped or skipped norm would show."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(1 + 0.5 * torch.randn_like(p))


@pytest.mark.parametrize("name", SHAPES)
def test_logits_equal_transformers(name):
    torch.manual_seed(0)
    config = small_config(**SHAPES[name])
    ours = Qwen3ForCausalLM(config).eval()
    randomize_norms(ours)
    reference = ReferenceQwen3(Qwen3Config(**config.to_hf_dict(), attn_implementation="eager")).eval()
    reference.load_state_dict(ours.state_dict(), strict=True)  # same names, no mapping
    input_ids = torch.randint(0, config.vocab_size, (2, 40))
    with torch.no_grad():
        expected = reference(input_ids).logits
        assert (ours(input_ids) - expected).abs().max() < 1e-4
        eager = Qwen3ForCausalLM(config, attention="eager").eval()
        eager.load_state_dict(ours.state_dict())
        assert (eager(input_ids) - expected).abs().max() < 1e-4


@pytest.mark.parametrize("name", ["gqa", "one_kv_head", "untied"])
def test_kv_cache_decoding_equals_full_forward(name):
    torch.manual_seed(1)
    config = small_config(**SHAPES[name])
    model = Qwen3ForCausalLM(config).eval()
    input_ids = torch.randint(0, config.vocab_size, (3, 30))
    with torch.no_grad():
        full = model(input_ids)
        cache = model.new_kv_cache(batch_size=3, max_len=32)
        pieces = [model(input_ids[:, :11], kv_cache=cache)]  # prefill
        pieces.append(model(input_ids[:, 11:15], kv_cache=cache))  # a chunk with a cache offset
        for t in range(15, 30):  # then one token at a time
            pieces.append(model(input_ids[:, t:t + 1], kv_cache=cache))
    assert cache.length == 30
    assert (torch.cat(pieces, dim=1) - full).abs().max() < 1e-5


def test_left_padding_with_mask_matches_unpadded():
    torch.manual_seed(2)
    config = small_config()
    model = Qwen3ForCausalLM(config).eval()
    short = torch.randint(1, config.vocab_size, (1, 7))
    pad = 5
    padded = torch.cat([torch.zeros(1, pad, dtype=torch.long), short], dim=1)
    mask = torch.cat([torch.zeros(1, pad, dtype=torch.long), torch.ones(1, 7, dtype=torch.long)], dim=1)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        expected = model(short)
        got = model(padded, position_ids=positions, attention_mask=mask)[:, pad:]
    assert (got - expected).abs().max() < 1e-5


def test_logits_to_keep_returns_last_positions():
    model = Qwen3ForCausalLM(small_config()).eval()
    input_ids = torch.randint(0, 320, (2, 9))
    with torch.no_grad():
        assert torch.allclose(model(input_ids, logits_to_keep=1), model(input_ids)[:, -1:], atol=1e-6)


def test_tied_embeddings_share_one_matrix():
    tied = Qwen3ForCausalLM(small_config())
    untied = Qwen3ForCausalLM(small_config(tie_word_embeddings=False))
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    assert untied.num_parameters() - tied.num_parameters() == 320 * 64


def test_seed_preset_has_the_seeds_parameter_count():
    model_config, _ = preset("seed")
    assert model_config.vocab_size == 49152
    with torch.device("meta"):
        count = Qwen3ForCausalLM(model_config).num_parameters()
    assert round(count / 1e6, 2) == 7.03


def test_qwen3_06b_preset_has_the_real_parameter_count():
    model_config, _ = preset("qwen3-0.6b")
    with torch.device("meta"):
        count = Qwen3ForCausalLM(model_config).num_parameters()
    assert 595e6 < count < 597e6  # Qwen3-0.6B: 596M with tied embeddings


def test_rope_rotates_by_position_not_by_head():
    """The seed's bug: the rotation must depend on the token position and be the same for every head."""
    model = Qwen3ForCausalLM(small_config()).eval()
    cos, sin = model.model.rotary_emb(torch.arange(6)[None], torch.float32)
    assert cos.shape == (1, 1, 6, 32)  # (B, 1, T, head_dim): broadcast over heads
    assert torch.allclose(cos[0, 0, 0], torch.ones(32))  # position 0: no rotation
    assert not torch.allclose(cos[0, 0, 1], cos[0, 0, 2])


def test_position_beyond_context_is_a_clear_error():
    model = Qwen3ForCausalLM(small_config(max_position_embeddings=16)).eval()
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(torch.zeros(1, 17, dtype=torch.long))
