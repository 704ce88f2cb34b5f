"""Muon for the hidden matrices, AdamW for the rest: one optimizer, on one device or sharded over ranks.

Where it sits: the training loop builds it with `build_optimizer(model, ...)`, sets each group's
`lr` (= `initial_lr` x schedule), `momentum` (Muon groups) and `weight_decay` before every step,
and calls `step()`; `model/checkpoint.py` saves `state_dict()` once per rank.

Muon (Keller Jordan, 2024): keep a Nesterov momentum of the gradient, replace it by the nearest
semi-orthogonal matrix (all singular values ~1) with a few Newton-Schulz iterations, and step along
that. It suits the 2-D matrices inside the blocks. The embedding (a lookup table), the output head
and any scalars get AdamW, as in modded-nanogpt and nanochat.

No DDP. After backward every rank holds gradients of its own micro-batches; `step()` then
  1. reduce-scatters the gradients (averaging over ranks, so N ranks with B rows each update exactly
     as one rank would with the N*B rows, given a loss that is a mean over rows),
  2. lets each rank update only its part: for AdamW a 1/N slice of every flattened tensor, for Muon
     whole matrices (orthogonalization needs the whole matrix): the matrices of one shape are
     stacked and rank r owns the r-th block of that stack,
  3. all-gathers the updated values into every rank's parameters.
So each rank keeps optimizer state only for its part (ZeRO-2 style), and `state_dict()` is this
rank's shard. The collectives are started asynchronously so communication overlaps the math.
On one device the same code runs with N = 1 and no communication.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from chatforge.errors import CheckpointError

# torch 2.13 renamed the single-tensor collectives; 2.11 only has the old names
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

# Quintic Newton-Schulz coefficients tuned (Jordan 2024) to push every singular value in (0, 1]
# into roughly [0.7, 1.2] within 5 steps, trading exactness for a steep slope near zero.
NS_COEFFS = (3.4445, -4.7750, 2.0315)


def newton_schulz(G: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """Approximately orthogonalize G (..., rows, cols): U S V^T -> U S' V^T with S' ~ 1.

    Runs in bf16 on CUDA (fast, and the iteration tolerates it) and in fp32 elsewhere.
    """
    a, b, c = NS_COEFFS
    dtype = torch.bfloat16 if G.is_cuda else torch.float32
    X = G.to(dtype)
    tall = G.size(-2) > G.size(-1)
    if tall:  # iterate on the wide orientation: the Gram matrix X X^T is then the smaller one
        X = X.mT
    # Frobenius norm >= spectral norm, so this puts every singular value in [0, 1]
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + eps)
    for _ in range(steps):
        A = X @ X.mT
        B = _matmul_add(A, A, A, beta=b, alpha=c)  # b*A + c*A@A
        X = _matmul_add(X, B, X, beta=a, alpha=1.0)  # a*X + B@X
    return X.mT if tall else X


def _matmul_add(bias: torch.Tensor, m1: torch.Tensor, m2: torch.Tensor, beta: float, alpha: float) -> torch.Tensor:
    """beta*bias + alpha*(m1 @ m2) as one GEMM with accumulation (no separate scale and add passes:
    on an H200 those were a quarter of the optimizer step at depth 20)."""
    if m1.dim() == 2:
        return torch.addmm(bias, m1, m2, beta=beta, alpha=alpha)
    lead = m1.shape[:-2]
    out = torch.baddbmm(bias.reshape(-1, *bias.shape[-2:]), m1.reshape(-1, *m1.shape[-2:]),
                        m2.reshape(-1, *m2.shape[-2:]), beta=beta, alpha=alpha)
    return out.reshape(*lead, *out.shape[-2:])


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class MuonAdamW(torch.optim.Optimizer):
    """Param groups have `kind` "muon" (params of one shape) or "adamw", and `initial_lr`."""

    def __init__(self, param_groups: list[dict]):
        defaults = dict(lr=0.0, weight_decay=0.0)
        super().__init__(param_groups, defaults)
        for group in self.param_groups:
            group.setdefault("initial_lr", group["lr"])
            if group["kind"] == "muon":
                shapes = {tuple(p.shape) for p in group["params"]}
                if len(shapes) != 1 or len(next(iter(shapes))) != 2:
                    raise ValueError(f"a muon group needs 2-D params of one shape, got {sorted(shapes)}")
            elif group["kind"] != "adamw":
                raise ValueError(f"unknown param group kind {group['kind']!r}")

    # ---- this rank's shard of the state

    def pending_state_bytes(self) -> int:
        """Bytes of state this rank allocates at its first step that it does not hold yet (0 once
        stepped or loaded): Muon's momentum for the matrices it owns, AdamW's two moments of its shard.
        The auto device batch (train/autobatch.py) holds this much aside while it measures."""
        if self.state:
            return 0
        _, world = _world()
        total = 0
        for group in self.param_groups:
            params = group["params"]
            if group["kind"] == "muon":
                total += -(-len(params) // world) * params[0].numel() * params[0].element_size()
            else:
                total += sum(2 * -(-p.numel() // world) * p.element_size() for p in params)
        return total

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["sharding"] = dict(zip(("rank", "world_size"), _world()))
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        saved = state_dict.pop("sharding", None)
        now = dict(zip(("rank", "world_size"), _world()))
        if saved is not None and saved != now:
            raise CheckpointError(
                f"optimizer shard was saved by rank {saved['rank']} of {saved['world_size']} but this is rank "
                f"{now['rank']} of {now['world_size']}; resume with the same number of processes "
                f"(torchrun --nproc_per_node={saved['world_size']})")
        super().load_state_dict(state_dict)

    # ---- the step

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("MuonAdamW.step does not take a closure")
        rank, world = _world()
        # 1. start every reduce-scatter, in group order
        pending = []
        for group in self.param_groups:
            if group["kind"] == "muon":
                pending.append(self._start_muon(group, rank, world))
            else:
                pending.extend(self._start_adamw(group, p, rank, world) for p in group["params"])
        # 2. as each gradient shard arrives, update it and start gathering the result
        gathers = []
        for job in pending:
            if job["work"] is not None:
                job["work"].wait()
            gathers.append(job["update"](job))
        # 3. wait for the gathers and write the full values back into the parameters
        for finish in gathers:
            finish()

    def _start_muon(self, group, rank, world):
        params = group["params"]
        n = len(params)
        per_rank = -(-n // world)  # ceil: the stack is padded with zero matrices to world * per_rank
        rows, cols = params[0].shape
        grads = torch.zeros((per_rank * world, rows, cols), device=params[0].device, dtype=params[0].dtype)
        for i, p in enumerate(params):
            if p.grad is not None:
                grads[i].copy_(p.grad)
        job = {"group": group, "rank": rank, "world": world, "per_rank": per_rank, "update": self._muon_update}
        if world > 1:
            job["grad"] = torch.empty((per_rank, rows, cols), device=grads.device, dtype=grads.dtype)
            job["work"] = _reduce_scatter(job["grad"], grads, dist.ReduceOp.SUM, async_op=True)
            job["send"] = grads  # keep the input alive until the collective is done
        else:
            job["grad"], job["work"] = grads, None
        return job

    def _muon_update(self, job):
        group, rank, world, per_rank = job["group"], job["rank"], job["world"], job["per_rank"]
        params = group["params"]
        grad = job["grad"]
        if world > 1:
            grad.div_(world)
        first = rank * per_rank
        owned = [params[i] for i in range(first, min(first + per_rank, len(params)))]
        new_values = torch.zeros_like(grad)  # padding rows stay zero and are never copied back
        if owned:
            k = len(owned)
            g = grad[:k]
            bufs = []
            for p in owned:
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                bufs.append(state["momentum_buffer"])
            m = group["momentum"]
            buf = torch.stack(bufs)
            buf.lerp_(g, 1 - m)                     # momentum: buf = m*buf + (1-m)*g
            torch._foreach_copy_(bufs, list(buf.unbind(0)))
            direction = newton_schulz(g.lerp(buf, m), steps=group.get("ns_steps", 5))  # Nesterov look-ahead
            rows, cols = owned[0].shape
            lr = group["lr"] * max(1.0, rows / cols) ** 0.5  # equal RMS update for tall matrices
            current = torch.stack(owned)
            current.mul_(1 - group["lr"] * group["weight_decay"])  # decoupled weight decay
            current.add_(direction.to(current.dtype), alpha=-lr)
            new_values[:k] = current
        if world == 1:
            torch._foreach_copy_(params, list(new_values[:len(params)].unbind(0)))
            return lambda: None
        gathered = torch.empty((per_rank * world,) + tuple(params[0].shape), device=grad.device, dtype=grad.dtype)
        work = _all_gather(gathered, new_values, async_op=True)

        def finish(_send=new_values):  # holding the input keeps it alive until the gather is done
            work.wait()
            torch._foreach_copy_(params, list(gathered[:len(params)].unbind(0)))
        return finish

    def _start_adamw(self, group, p, rank, world):
        numel = p.numel()
        shard = -(-numel // world)
        flat = torch.zeros(shard * world, device=p.device, dtype=p.dtype)
        if p.grad is not None:
            flat[:numel].copy_(p.grad.reshape(-1))
        job = {"group": group, "param": p, "rank": rank, "world": world, "shard": shard, "update": self._adamw_update}
        if world > 1:
            job["grad"] = torch.empty(shard, device=p.device, dtype=p.dtype)
            job["work"] = _reduce_scatter(job["grad"], flat, dist.ReduceOp.SUM, async_op=True)
            job["send"] = flat  # keep the input alive until the collective is done
        else:
            job["grad"], job["work"] = flat, None
        return job

    def _adamw_update(self, job):
        group, p, rank, world, shard = job["group"], job["param"], job["rank"], job["world"], job["shard"]
        grad = job["grad"]
        if world > 1:
            grad.div_(world)
        numel = p.numel()
        start, stop = rank * shard, min((rank + 1) * shard, numel)
        valid = max(0, stop - start)
        full = torch.zeros(shard * world, device=p.device, dtype=p.dtype)
        full[:numel].copy_(p.reshape(-1))
        value = full[rank * shard:(rank + 1) * shard]  # this rank's slice (padding past numel is inert)
        state = self.state[p]
        if "step" not in state:
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["exp_avg"] = torch.zeros(shard, device=p.device, dtype=p.dtype)
            state["exp_avg_sq"] = torch.zeros(shard, device=p.device, dtype=p.dtype)
        state["step"] += 1
        step = state["step"].item()
        beta1, beta2 = group["betas"]
        lr = group["lr"]
        state["exp_avg"].lerp_(grad, 1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        bias1, bias2 = 1 - beta1 ** step, 1 - beta2 ** step
        denom = (state["exp_avg_sq"] / bias2).sqrt_().add_(group["eps"])
        if valid:
            value.mul_(1 - lr * group["weight_decay"])
            value.addcdiv_(state["exp_avg"], denom, value=-lr / bias1)
        if world == 1:
            p.copy_(full[:numel].view_as(p))
            return lambda: None
        gathered = torch.empty_like(full)
        send = value.contiguous()
        work = _all_gather(gathered, send, async_op=True)

        def finish(_send=send):  # holding the input keeps it alive until the gather is done
            work.wait()
            p.copy_(gathered[:numel].view_as(p))
        return finish


def build_optimizer(model, *, matrix_lr: float = 0.02, embedding_lr: float = 0.2, unembedding_lr: float = 0.004,
                    scalar_lr: float = 0.5, weight_decay: float = 0.0, betas: tuple[float, float] = (0.8, 0.95),
                    eps: float = 1e-10, momentum: float = 0.95, ns_steps: int = 5) -> MuonAdamW:
    """Muon for every 2-D matrix inside the blocks (one group per shape), AdamW for the rest.

    `weight_decay` applies to the Muon groups (the loop may schedule it); AdamW groups start at 0.
    The learning rates are used as given: scaling them with width is `model/scaling.py`'s job.
    """
    muon_by_shape: dict[tuple, list] = {}
    embedding, head, scalars = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.startswith("transformer.h.") and p.ndim == 2:
            muon_by_shape.setdefault(tuple(p.shape), []).append(p)
        elif name.startswith("transformer.wte"):
            embedding.append(p)
        elif name.startswith("lm_head"):
            head.append(p)
        else:
            scalars.append(p)
    groups = []
    for shape in sorted(muon_by_shape):
        groups.append(dict(params=muon_by_shape[shape], kind="muon", lr=matrix_lr, initial_lr=matrix_lr,
                           momentum=momentum, weight_decay=weight_decay, ns_steps=ns_steps))
    for params, lr in ((embedding, embedding_lr), (head, unembedding_lr), (scalars, scalar_lr)):
        if params:
            groups.append(dict(params=params, kind="adamw", lr=lr, initial_lr=lr, betas=tuple(betas), eps=eps,
                               weight_decay=0.0))
    return MuonAdamW(groups)
