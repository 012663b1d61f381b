"""int8 and int4 linear layers (qwen3/infer/quantize.py): their kernels against float, each row alike
alone or in a batch, greedy decoding alone equal to batched, the compiled step, perplexity on a trained
tiny run, and a quantized model that cannot be saved as a checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_generate import GREEDY, build_checkpoint

from qwen3 import cli
from qwen3.data.sources import kjv_books
from qwen3.errors import UserError
from qwen3.infer.engine import load_engine
from qwen3.infer.quantize import INT4_GROUP, Int4Linear, Int8Linear, chunked_perplexity, quantize
from qwen3.model.checkpoint import load_model, save_model

pytestmark = pytest.mark.usefixtures("one_thread")
WIDTHS = {"int8": Int8Linear, "int4": Int4Linear}
PROMPTS = ["In the beginning", "And God said, Let there be light", "The", "The LORD is my shepherd"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_checkpoint(tmp_path_factory.mktemp("quantize") / "ckpt")


@pytest.mark.parametrize("kind", WIDTHS)
def test_a_layer_is_close_to_float_and_each_row_is_computed_alone(kind: str) -> None:
    torch.manual_seed(0)
    linear = torch.nn.Linear(4 * INT4_GROUP, 96, bias=True)
    layer = WIDTHS[kind](linear)
    x = torch.randn(9, 4 * INT4_GROUP)
    x[3] *= 50  # a row with large values must not change the others' quantization
    with torch.no_grad():
        exact, batch = linear(x), layer(x)
    error = (batch - exact).abs().amax(dim=1) / exact.abs().amax(dim=1)
    assert error.max() < {"int8": 0.02, "int4": 0.15}[kind], error  # int4: 16 levels per group
    for row in range(len(x)):  # bit for bit: a row's result does not depend on the batch around it
        assert torch.equal(layer(x[row:row + 1]), batch[row:row + 1])
    assert layer(x.view(3, 3, -1)).shape == (3, 3, 96)
    assert torch.equal(layer(torch.cat([x, x], dim=1)[:, :x.shape[1]]), batch)  # rows strided apart


def test_int8_products_are_exact_integer_sums() -> None:
    """fbgemm's int8 GEMM adds pairs of products in 16 bits on CPUs without VNNI: the input levels must
    keep it from saturating (an error of thousands), so the product is the float reference of the same
    integers up to the rounding of the scales (1 / levels is not exact in binary)."""
    torch.manual_seed(1)
    linear = torch.nn.Linear(256, 64, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.randint(-127, 128, (64, 256)).float())  # exactly representable: scale 1
        linear.weight[:, 0] = 127
    layer = Int8Linear(linear)
    levels = layer.levels
    x = torch.randint(-levels, levels + 1, (5, 256)).float()
    x[:, 0] = levels  # the largest magnitude: the row's scale is 1
    with torch.no_grad():
        torch.testing.assert_close(layer(x), x @ linear.weight.t(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("kind", [None, *WIDTHS])
def test_each_width_decodes_alone_as_in_a_batch(folder: Path, kind: str | None) -> None:
    """generate, generate_batch of one prompt and a batch of four give each prompt the same tokens."""
    engine = load_engine(folder, device="cpu", quantize=kind)
    assert isinstance(engine.model.lm_head, WIDTHS.get(kind, torch.nn.Linear))
    batch = engine.generate_batch(PROMPTS, GREEDY)
    for prompt, together in zip(PROMPTS, batch):
        alone = engine.generate(prompt, GREEDY)
        assert alone.token_ids == together.token_ids == engine.generate_batch([prompt], GREEDY)[0].token_ids


@pytest.mark.slow
@pytest.mark.parametrize("kind", WIDTHS)
def test_compiled_quantized_decoding_matches_eager(folder: Path, kind: str) -> None:
    eager = load_engine(folder, device="cpu", quantize=kind)
    compiled = load_engine(folder, device="cpu", quantize=kind, compile=True)
    for prompts in (PROMPTS[:1], PROMPTS):
        assert ([c.token_ids for c in compiled.generate_batch(prompts, GREEDY)]
                == [c.token_ids for c in eager.generate_batch(prompts, GREEDY)])


def test_a_quantized_model_is_never_saved_as_a_checkpoint(folder: Path, tmp_path: Path) -> None:
    model = quantize(load_model(folder), "int8")
    with pytest.raises(UserError, match="inference only"):
        save_model(model, tmp_path / "int8")
    assert not (tmp_path / "int8").exists()


def test_bad_quantization_requests_are_one_line_errors(folder: Path, tmp_path: Path, capsys) -> None:
    with pytest.raises(UserError, match="supported: int8, int4"):
        load_engine(folder, device="cpu", quantize="int2")
    odd = build_checkpoint(tmp_path / "odd")  # hidden 64 but intermediate 128: fine; widen to break it
    model = load_model(odd)
    model.model.layers[0].mlp.down_proj = torch.nn.Linear(40, 64)
    with pytest.raises(UserError, match="multiples of 32; model.layers.0.mlp.down_proj has 40"):
        quantize(model, "int4")
    with pytest.raises(SystemExit):
        cli.main(["generate", str(folder), "--prompt", "x", "--quantize", "int2"])
    assert "invalid choice" in capsys.readouterr().err


@pytest.mark.slow
def test_each_width_keeps_the_perplexity_of_float32_on_a_trained_run(tmp_path: Path) -> None:
    cli.main(["train", "--preset", "tiny", "--out", str(tmp_path / "run"), "--max-steps", "150",
              "--set", f"cache_dir={tmp_path / 'cache'}", "--set", "device=cpu", "--set", "dtype=float32",
              "--set", "eval_interval=150"])
    checkpoint = tmp_path / "run" / "best"
    engine = load_engine(checkpoint, device="cpu")
    ids = engine.tokenizer.encode("\n\n".join(kjv_books()[-1].split("\n\n")[:100]))  # the held-out book
    context = engine.model.config.max_position_embeddings
    reference = chunked_perplexity(engine.model, ids, context)
    for kind, tolerance in (("int8", 0.01), ("int4", 0.03)):
        quantized = chunked_perplexity(quantize(load_model(checkpoint), kind), ids, context)
        assert abs(quantized / reference - 1) < tolerance, (kind, quantized, reference)
    bfloat16 = chunked_perplexity(load_model(checkpoint, dtype=torch.bfloat16), ids, context)
    assert abs(bfloat16 / reference - 1) < 0.01, (bfloat16, reference)
