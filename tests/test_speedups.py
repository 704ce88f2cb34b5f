"""FP8 linear layers (run through torch._scaled_mm's CPU path) and prepare_model's refusals."""

import pytest
import torch

from chatforge.errors import UsageError
from chatforge.model.gpt import GPT, GPTConfig
from chatforge.model.speedups import Float8Linear, convert_to_float8, prepare_model
from chatforge.runtime import init_runtime


def _pair():
    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=16, vocab_size=64, n_layer=2, n_head=2, n_kv_head=2, n_embd=32))
    with torch.no_grad():
        for block in model.transformer.h:
            block.attn.c_proj.weight.normal_(0, 0.1)
            block.mlp.c_proj.weight.normal_(0, 0.1)
    ref = GPT(model.config)
    ref.load_state_dict(model.state_dict())
    return model, ref


def test_float8_model_keeps_its_parameters_and_tracks_the_fp32_model():
    model, ref = _pair()
    keys = list(model.state_dict())
    assert convert_to_float8(model) == 2 * 6
    assert list(model.state_dict()) == keys
    assert type(model.lm_head) is torch.nn.Linear  # the head stays high precision
    assert isinstance(model.transformer.h[0].attn.c_q, Float8Linear)
    idx = torch.randint(0, 64, (2, 16))
    loss8, loss = model(idx, idx), ref(idx, idx)
    assert abs(loss8.item() - loss.item()) < 0.02 * loss.item()
    loss8.backward()
    loss.backward()
    for (name, p8), p in zip(model.named_parameters(), ref.parameters()):
        cos = torch.nn.functional.cosine_similarity(p8.grad.flatten(), p.grad.flatten(), dim=0)
        assert cos > 0.97, (name, cos.item())  # fp8 gradients point the same way


def test_prepare_model_refuses_fp8_without_a_gpu_and_skips_compile_on_cpu():
    rt = init_runtime(device="cpu", announce=False)
    model, _ = _pair()
    with pytest.raises(UsageError, match="--fp8"):
        prepare_model(model, rt, compile=False, fp8=True)
    assert prepare_model(model, rt, compile=True, fp8=False) is model
