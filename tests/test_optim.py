"""Muon + AdamW: orthogonalization vs SVD, first-step updates vs hand-computed ones, sharded == single."""

import copy
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from chatforge.errors import CheckpointError
from chatforge.model.gpt import GPT, GPTConfig
from chatforge.model.optim import build_optimizer, newton_schulz

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("shape", [(64, 32), (32, 96), (48, 48)])
def test_newton_schulz_matches_svd_polar_factor(shape):
    torch.manual_seed(0)
    G = torch.randn(shape, dtype=torch.float64)
    U, S, Vh = torch.linalg.svd(G, full_matrices=False)
    polar = U @ Vh  # the exact orthogonalization U V^T
    X = newton_schulz(G.float()).double()
    # same singular vectors: U^T X V is (nearly) diagonal ...
    core = U.mT @ X @ Vh.mT
    off = core - torch.diag(torch.diagonal(core))
    assert off.norm() < 0.05 * core.norm()
    # ... and the singular values land in the band the quintic iteration targets (~0.7..1.2)
    sv = torch.linalg.svdvals(X)
    assert sv.min() > 0.55 and sv.max() < 1.25, (sv.min(), sv.max())
    cos = (X * polar).sum() / (X.norm() * polar.norm())
    assert cos > 0.97


def test_newton_schulz_is_batched_and_scale_free():
    torch.manual_seed(1)
    G = torch.randn(3, 16, 8)
    X = newton_schulz(G)
    for i in range(3):
        torch.testing.assert_close(X[i], newton_schulz(G[i]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(newton_schulz(G * 1000.0), X, rtol=1e-4, atol=1e-4)


def _model(seed=0, n_layer=3):
    torch.manual_seed(seed)
    model = GPT(GPTConfig(sequence_len=8, vocab_size=61, n_layer=n_layer, n_head=2, n_kv_head=1, n_embd=16))
    with torch.no_grad():  # non-zero output projections so every matrix gets a gradient at step 1
        for block in model.transformer.h:
            block.attn.c_proj.weight.normal_(0, 0.1)
            block.mlp.c_proj.weight.normal_(0, 0.1)
    return model


def test_groups_cover_every_parameter_once_with_kind_and_initial_lr():
    model = _model()
    opt = build_optimizer(model, matrix_lr=0.03, embedding_lr=0.3, unembedding_lr=0.005)
    seen = [id(p) for g in opt.param_groups for p in g["params"]]
    assert sorted(seen) == sorted(id(p) for p in model.parameters())
    kinds = {g["kind"] for g in opt.param_groups}
    assert kinds == {"muon", "adamw"}
    for g in opt.param_groups:
        assert g["initial_lr"] == g["lr"]
        if g["kind"] == "muon":
            assert "momentum" in g and len({tuple(p.shape) for p in g["params"]}) == 1
    lrs = {g["lr"] for g in opt.param_groups if g["kind"] == "adamw"}
    assert lrs == {0.3, 0.005}


def test_first_step_equals_hand_computed_update():
    model = _model()
    before = copy.deepcopy(model)
    opt = build_optimizer(model, matrix_lr=0.02, embedding_lr=0.2, unembedding_lr=0.004, weight_decay=0.1)
    idx = torch.randint(0, 61, (2, 8))
    model(idx, idx).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    opt.step()
    old = dict(before.named_parameters())
    for name, p in model.named_parameters():
        g = grads[name]
        if name.startswith("transformer.h."):
            # from zero momentum the Nesterov direction is a multiple of g, and NS ignores the scale
            rows, cols = p.shape
            lr = 0.02 * max(1, rows / cols) ** 0.5
            expected = old[name] * (1 - 0.02 * 0.1) - lr * newton_schulz(g)
        else:
            lr = 0.2 if "wte" in name else 0.004
            expected = old[name] - lr * g / (g.abs() + 1e-10)  # Adam's first step is lr * sign(g)
        # NS amplifies fp32 rounding in near-zero singular values (rank-deficient tiny-batch grads),
        # so compare at 1e-4 absolute: ~0.5% of a Muon step of this size, far below a wrong scale or sign
        torch.testing.assert_close(p.detach(), expected, rtol=0, atol=1e-4, msg=lambda m: f"{name}: {m}")


def test_pending_state_bytes_is_what_the_first_step_allocates():
    model = _model()
    opt = build_optimizer(model)
    pending = opt.pending_state_bytes()
    _train_steps(model, opt, [torch.randint(0, 61, (2, 9))])
    allocated = sum(t.numel() * t.element_size() for state in opt.state.values() for t in state.values()
                    if isinstance(t, torch.Tensor) and t.dim() > 0)
    assert pending == allocated > 0
    assert opt.pending_state_bytes() == 0  # held now


def _train_steps(model, opt, batches):
    for idx in batches:
        opt.zero_grad(set_to_none=True)
        model(idx[:, :-1], idx[:, 1:]).backward()
        opt.step()


def test_state_dict_round_trip_continues_identically():
    torch.manual_seed(3)
    batches = [torch.randint(0, 61, (2, 9)) for _ in range(3)]
    model = _model()
    opt = build_optimizer(model)
    _train_steps(model, opt, batches[:2])
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    _train_steps(model, opt, batches[2:])

    resumed = _model(seed=99)
    resumed.load_state_dict(saved_model)
    opt2 = build_optimizer(resumed)
    opt2.load_state_dict(saved_opt)
    _train_steps(resumed, opt2, batches[2:])
    for (name, a), b in zip(model.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name


def test_loading_a_shard_from_another_world_size_names_the_fix():
    model = _model()
    opt = build_optimizer(model)
    saved = opt.state_dict()
    saved["sharding"] = {"rank": 1, "world_size": 4}
    with pytest.raises(CheckpointError, match="nproc_per_node=4"):
        build_optimizer(model).load_state_dict(saved)


WORKER = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, {tests!r})
    from chatforge.runtime import init_runtime, shutdown
    from test_optim import _model, _train_steps
    from chatforge.model.optim import build_optimizer
    rt = init_runtime(device="cpu", seed=0, announce=False)
    torch.manual_seed(5)
    batches = [torch.randint(0, 61, (4, 9)) for _ in range(3)]
    half = 4 // rt.world_size
    mine = [b[rt.rank * half:(rt.rank + 1) * half] for b in batches]
    model = _model()
    opt = build_optimizer(model, weight_decay=0.05)
    _train_steps(model, opt, mine)
    torch.save({{"params": model.state_dict(), "optim": opt.state_dict()}}, sys.argv[1] + f"/rank{{rt.rank}}.pt")
    shutdown()
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_gloo_ranks_equal_one_process_on_the_whole_batch(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(tests=str(REPO / "tests")))
    port = _free_port()
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, str(script), str(tmp_path)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    for p in procs:
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0, out
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]

    torch.manual_seed(5)
    batches = [torch.randint(0, 61, (4, 9)) for _ in range(3)]
    model = _model()
    opt = build_optimizer(model, weight_decay=0.05)
    _train_steps(model, opt, batches)
    for name, ref in model.state_dict().items():
        for r in range(2):
            torch.testing.assert_close(ranks[r]["params"][name], ref, rtol=1e-5, atol=1e-5, msg=f"rank {r}: {name}")
    # each rank kept only its shard: Muon momentum for its own matrices, half of every Adam moment
    full = opt.state_dict()["state"]
    shard0, shard1 = ranks[0]["optim"]["state"], ranks[1]["optim"]["state"]
    muon_keys = [k for k, v in full.items() if "momentum_buffer" in v]
    assert sorted(set(shard0) & set(muon_keys)) != sorted(set(shard1) & set(muon_keys))
    assert len(set(shard0) & set(muon_keys)) + len(set(shard1) & set(muon_keys)) == len(muon_keys)
    for k, v in full.items():
        if "exp_avg" in v:
            n = v["exp_avg"].numel()
            joined = torch.cat([shard0[k]["exp_avg"], shard1[k]["exp_avg"]])[:n]
            torch.testing.assert_close(joined, v["exp_avg"], rtol=1e-5, atol=1e-7)
