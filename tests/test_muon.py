"""Our Muon against torch.optim.Muon, Newton–Schulz's spectrum, stacks and ranks, and the Muon/AdamW
parameter split."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from qwen3.config import ModelConfig
from qwen3.model.decoder import Qwen3ForCausalLM
from qwen3.train.muon import Muon, build_optimizers, newton_schulz, split_parameters


@pytest.mark.parametrize("shape", [(96, 32), (32, 96), (64, 64)], ids=["tall", "wide", "square"])
@pytest.mark.parametrize("nesterov,weight_decay", [(True, 0.0), (True, 0.1), (False, 0.05)])
def test_muon_matches_torch_muon(shape, nesterov, weight_decay):
    torch.manual_seed(0)
    start = torch.randn(shape)
    ours_param = torch.nn.Parameter(start.clone())
    reference_param = torch.nn.Parameter(start.clone())
    ours = Muon([ours_param], lr=0.02, momentum=0.95, nesterov=nesterov, weight_decay=weight_decay, ns_steps=5)
    reference = torch.optim.Muon([reference_param], lr=0.02, momentum=0.95, nesterov=nesterov,
                                 weight_decay=weight_decay, ns_coefficients=(3.4445, -4.7750, 2.0315),
                                 ns_steps=5, adjust_lr_fn="original")
    for _ in range(6):
        grad = torch.randn(shape)
        ours_param.grad, reference_param.grad = grad.clone(), grad.clone()
        ours.step()
        reference.step()
    ours_change = ours_param.detach() - start
    reference_change = reference_param.detach() - start
    relative_error = (ours_change - reference_change).norm() / reference_change.norm()
    assert relative_error < 0.03  # within bfloat16 rounding


@pytest.mark.parametrize("shape", [(128, 32), (32, 128), (64, 64)])
def test_newton_schulz_singular_values_near_one(shape):
    torch.manual_seed(0)
    # A badly conditioned matrix: singular values spread over two orders of magnitude.
    u, _ = torch.linalg.qr(torch.randn(shape[0], shape[0]))
    v, _ = torch.linalg.qr(torch.randn(shape[1], shape[1]))
    k = min(shape)
    s = torch.logspace(0, -2, k)
    grad = u[:, :k] @ torch.diag(s) @ v[:, :k].T
    singular = torch.linalg.svdvals(newton_schulz(grad, steps=5).float())
    assert singular.min() > 0.5 and singular.max() < 1.5  # all directions move about equally


def test_a_stack_is_orthogonalized_exactly_as_each_matrix_alone():
    torch.manual_seed(0)
    stack = torch.randn(5, 96, 32)
    together = newton_schulz(stack)
    assert all(torch.equal(together[i], newton_schulz(stack[i])) for i in range(5))


# Both ranks hold the same gradients (as after DDP's all-reduce); the weights are written to a file.
SHARED_MUON = textwrap.dedent("""
    import json, sys
    import torch, torch.distributed as dist
    import qwen3.train.muon as muon
    from qwen3.config import ModelConfig
    from qwen3.model.decoder import Qwen3ForCausalLM

    if len(sys.argv) > 2:
        dist.init_process_group("gloo")
    orthogonalized = []
    plain = muon.newton_schulz
    muon.newton_schulz = lambda stack, steps: orthogonalized.append(len(stack)) or plain(stack, steps)
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
                                         num_hidden_layers=3, num_attention_heads=4,
                                         num_key_value_heads=2, head_dim=8))
    matrices, _, _ = muon.split_parameters(model)
    optimizer = muon.Muon(matrices, lr=0.02, weight_decay=0.1)
    generator = torch.Generator().manual_seed(1)
    for _ in range(3):
        for p in matrices:
            p.grad = torch.randn(p.shape, generator=generator)
        optimizer.step()
    rank = dist.get_rank() if dist.is_initialized() else 0
    torch.save([p.detach() for p in matrices], f"{sys.argv[1]}.{rank}.pt")
    json.dump(orthogonalized, open(f"{sys.argv[1]}.{rank}.json", "w"))
""")


def test_muon_shared_across_two_processes_equals_one_process(tmp_path):
    script = tmp_path / "shared_muon.py"
    script.write_text(SHARED_MUON)
    single = subprocess.run([sys.executable, str(script), str(tmp_path / "single")], capture_output=True,
                            text=True, timeout=120)
    assert single.returncode == 0, single.stderr[-2000:]
    shared = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(script), str(tmp_path / "shared"), "distributed"],
                            capture_output=True, text=True, timeout=180)
    assert shared.returncode == 0, shared.stderr[-2000:]
    expected = torch.load(tmp_path / "single.0.pt")
    for rank in (0, 1):
        assert all(torch.equal(a, b) for a, b in zip(torch.load(tmp_path / f"shared.{rank}.pt"), expected))
    # Per step and 3 layers: q and o (32 x 32), k and v (16 x 32), gate and up (48 x 32) make stacks of
    # 6, down (32 x 48) one of 3; each of two ranks orthogonalizes half of each, rounded up.
    assert sorted(json.loads((tmp_path / "single.0.json").read_text())) == [3] * 3 + [6] * 9
    for rank in (0, 1):
        assert sorted(json.loads((tmp_path / f"shared.{rank}.json").read_text())) == [2] * 3 + [3] * 9


def test_muon_rejects_non_matrices():
    with pytest.raises(ValueError, match="2-D"):
        Muon([torch.nn.Parameter(torch.ones(4))])


@pytest.mark.parametrize("tied", [True, False])
def test_split_puts_every_parameter_in_exactly_one_group(tied):
    model = Qwen3ForCausalLM(ModelConfig(vocab_size=100, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=2,
                                         num_key_value_heads=1, head_dim=16,
                                         tie_word_embeddings=tied, attention_bias=True))
    muon, decay, no_decay = split_parameters(model)
    ids = [id(p) for p in muon + decay + no_decay]
    assert len(ids) == len(set(ids)) == len({id(p) for p in model.parameters()})
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)].split(".")[-2] for p in muon} == {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert all(p.ndim == 1 for p in no_decay)  # norm gains and biases: no weight decay
    decay_ids = {id(p) for p in decay}
    assert id(model.model.embed_tokens.weight) in decay_ids
    assert id(model.lm_head.weight) in decay_ids  # tied: the same matrix as the embedding


def test_build_optimizers_records_peak_learning_rates():
    model = Qwen3ForCausalLM(ModelConfig(vocab_size=100, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2,
                                         num_key_value_heads=1, head_dim=16))
    muon, adamw = build_optimizers(model, "muon", muon_lr=0.02, adamw_lr=0.001)
    assert isinstance(muon, Muon) and isinstance(adamw, torch.optim.AdamW)
    assert all(g["initial_lr"] == 0.02 for g in muon.param_groups)
    (only,) = build_optimizers(model, "adamw", adamw_lr=0.001)
    assert sum(len(g["params"]) for g in only.param_groups) == len(list(model.parameters()))


@pytest.mark.parametrize("optimizer", ["muon", "adamw"])
@pytest.mark.parametrize("tied", [True, False])
def test_embedding_lr_gives_the_input_embedding_a_group_of_its_own(optimizer, tied):
    model = Qwen3ForCausalLM(ModelConfig(vocab_size=100, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2,
                                         num_key_value_heads=1, head_dim=16, tie_word_embeddings=tied))
    adamw = build_optimizers(model, optimizer, adamw_lr=0.001, embedding_lr=0.05)[-1]
    groups = adamw.param_groups
    embedding = model.model.embed_tokens.weight
    (own,) = [g for g in groups if any(p is embedding for p in g["params"])]
    assert own["params"] == [embedding] and own["lr"] == own["initial_lr"] == 0.05
    assert all(g["initial_lr"] == 0.001 for g in groups if g is not own)
    everything = [p for opt in build_optimizers(model, optimizer, embedding_lr=0.05) for g in opt.param_groups
                  for p in g["params"]]
    assert len({id(p) for p in everything}) == len(everything) == len(list(model.parameters()))
    plain = build_optimizers(model, optimizer, adamw_lr=0.001)[-1]
    assert all(g["initial_lr"] == 0.001 for g in plain.param_groups)
