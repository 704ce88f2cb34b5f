"""Bits per byte: validation loss that does not depend on the tokenizer's vocabulary.

Loss per token depends on how much text a token covers, so two tokenizers' losses cannot be
compared. Dividing the summed loss (in nats) by ln 2 times the number of UTF-8 bytes those tokens
decode to gives bits per byte of text, which can. Special tokens (token_bytes == 0) and ignored
targets (-1) count neither loss nor bytes.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from chatforge.errors import DataError


@torch.no_grad()
def evaluate_bpb(model: torch.nn.Module, batches, token_bytes: torch.Tensor, runtime) -> float:
    """Bits per byte of `model` over the `(inputs, targets)` batches, summed over all ranks.

    Every rank must call this with its own share of the batches (possibly a different number).
    """
    device = runtime.device
    token_bytes = token_bytes.to(device=device, dtype=torch.int64)
    total_nats = torch.zeros((), dtype=torch.float64, device=device)
    total_bytes = torch.zeros((), dtype=torch.int64, device=device)
    for inputs, targets in batches:
        inputs, targets = inputs.to(device), targets.to(device)
        with runtime.autocast():
            loss = model(inputs, targets, loss_reduction="none")
        loss = loss.reshape(-1).double()
        flat = targets.reshape(-1)
        valid = flat >= 0
        nbytes = torch.where(valid, token_bytes[flat.clamp(min=0)], torch.zeros_like(flat))
        counted = nbytes > 0
        total_nats += torch.where(counted, loss, torch.zeros_like(loss)).sum()
        total_bytes += nbytes.sum()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(total_nats, op=dist.ReduceOp.SUM)
        dist.all_reduce(total_bytes, op=dist.ReduceOp.SUM)
    nbytes = int(total_bytes.item())
    if nbytes == 0:
        raise DataError("no text bytes to evaluate: the split is too small for one batch of --device-batch-size "
                        "x --max-seq-len tokens; add documents to --data or lower --device-batch-size")
    return total_nats.item() / (math.log(2) * nbytes)
