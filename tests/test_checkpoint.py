"""Checkpoints: round trip, atomicity against a kill mid-save, finding tags/steps, shape checks."""

import json
import os
import random

import pytest
import torch

from chatforge import paths
from chatforge.errors import CheckpointError
from chatforge.model import checkpoint as ckpt
from chatforge.model.gpt import GPT, GPTConfig
from tiny_chat import tiny_tokenizer

TOKENIZER = tiny_tokenizer()


@pytest.fixture(autouse=True)
def saved_tokenizer():
    """checkpoint.load checks the base directory's tokenizer against the checkpoint's vocabulary."""
    TOKENIZER.save(paths.tokenizer_dir())


def tiny_config(**overrides) -> GPTConfig:
    fields = dict(sequence_len=16, vocab_size=TOKENIZER.vocab_size, n_layer=2, n_head=2, n_kv_head=2, n_embd=32)
    fields.update(overrides)
    return GPTConfig(**fields)


def trained_pair(seed=0, **overrides):
    """A tiny model and an AdamW that has taken one step (so it has state to save)."""
    torch.manual_seed(seed)
    config = tiny_config(**overrides)
    model = GPT(config)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = torch.randint(0, config.vocab_size, (2, config.sequence_len))
    model(x, x).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return model, opt, config


def save(model, opt, config, step, tag="d2", stage="base", **kwargs):
    return ckpt.save_checkpoint(stage, tag, step, model, opt, model_config=config.to_dict(),
                                vocab_size=config.vocab_size, **kwargs)


def test_round_trip_restores_weights_optimizer_loader_and_rng():
    model, opt, config = trained_pair()
    random.seed(5)
    torch.manual_seed(6)
    folder = save(model, opt, config, 7, loader_state={"doc": 12, "row": [1, 2]}, metrics={"val_bpb": 1.5})
    assert folder.name == "step_000007"
    assert sorted(p.name for p in folder.iterdir()) == ["meta.json", "model.pt", "optim_rank0.pt"]
    expected_py, expected_torch = random.random(), torch.rand(3)

    loaded = ckpt.load_checkpoint("base", "d2")
    meta = loaded["meta"]
    assert meta["step"] == 7 and meta["world_size"] == 1 and meta["vocab_size"] == TOKENIZER.vocab_size
    assert meta["model_config"] == config.to_dict()
    assert meta["loader_state"] == [{"doc": 12, "row": [1, 2]}]
    assert meta["metrics"] == {"val_bpb": 1.5}
    for k, v in model.state_dict().items():
        assert torch.equal(loaded["model"][k], v), k
    opt2 = torch.optim.AdamW(GPT(config).parameters(), lr=1e-2)
    opt2.load_state_dict(loaded["optimizer"])
    sd1, sd2 = opt.state_dict(), opt2.state_dict()
    assert sd1["param_groups"] == sd2["param_groups"]
    for idx in sd1["state"]:
        for key in sd1["state"][idx]:
            assert torch.equal(sd1["state"][idx][key], sd2["state"][idx][key])

    ckpt.restore_rng_state(meta["rng"][0])
    assert random.random() == expected_py
    assert torch.equal(torch.rand(3), expected_torch)


def test_load_gives_the_same_logits_in_eval_mode():
    model, opt, config = trained_pair()
    save(model, opt, config, 3)
    loaded = ckpt.load("base", device="cpu")
    rebuilt, meta = loaded.model, loaded.meta
    assert not rebuilt.training and meta["step"] == 3 and loaded.step == 3 and loaded.tag == "d2"
    assert loaded.optimizer is None and loaded.tokenizer.vocab_size == config.vocab_size
    x = torch.randint(0, config.vocab_size, (2, config.sequence_len))
    with torch.no_grad():
        assert torch.equal(rebuilt(x), model(x))


def test_kill_during_save_leaves_previous_checkpoint_usable():
    model, opt, config = trained_pair()
    save(model, opt, config, 2)
    # a save of step 4 killed part-way: its temp folder has a truncated model.pt and no meta.json
    tag_dir = paths.checkpoint_dir("base", "d2")
    partial = tag_dir / ".tmp-step_000004"
    partial.mkdir()
    (partial / "model.pt").write_bytes(b"\x80\x02truncated")
    assert ckpt.latest_step("base", "d2") == 2
    assert ckpt.load("base").meta["step"] == 2
    # the next save clears the debris and commits normally
    save(model, opt, config, 4)
    assert not partial.exists()
    assert ckpt.list_steps("base", "d2") == [2, 4]


def test_step_folder_without_meta_is_not_complete():
    model, opt, config = trained_pair()
    save(model, opt, config, 1)
    (paths.checkpoint_dir("base", "d2") / "step_000009").mkdir()  # e.g. copied by hand, half-way
    assert ckpt.latest_step("base", "d2") == 1


def test_keep_last_prunes_older_steps():
    model, opt, config = trained_pair()
    for step in (1, 2, 3, 4):
        save(model, opt, config, step, keep_last=2)
    assert ckpt.list_steps("base", "d2") == [3, 4]
    assert not any(p.name.startswith(".") for p in paths.checkpoint_dir("base", "d2").iterdir())


def test_default_tag_is_most_recently_written_and_errors_list_what_exists():
    model, opt, config = trained_pair()
    save(model, opt, config, 5, tag="alpha")
    save(model, opt, config, 6, tag="beta")
    alpha_meta = paths.checkpoint_dir("base", "alpha") / "step_000005" / "meta.json"
    os.utime(alpha_meta, (2e9, 2e9))  # alpha now looks newer
    assert ckpt.resolve("base")[:2] == ("alpha", 5)

    with pytest.raises(CheckpointError, match=r"tag 'gamma'.*available tags: alpha, beta"):
        ckpt.load_checkpoint("base", "gamma")
    with pytest.raises(CheckpointError, match=r"no complete step 9; available steps: 6"):
        ckpt.load_checkpoint("base", "beta", step=9)
    with pytest.raises(CheckpointError, match=r"no sft checkpoints under .*chatforge sft"):
        ckpt.load("sft")
    with pytest.raises(CheckpointError, match="unknown checkpoint stage"):
        ckpt.resolve("pre")


def test_other_shape_is_a_clear_error():
    model, opt, config = trained_pair()
    folder = save(model, opt, config, 1)
    meta = ckpt.read_meta(folder)
    other = tiny_config(n_layer=3, n_embd=64)
    with pytest.raises(CheckpointError, match=r"n_embd=32 vs 64; n_layer=2 vs 3.*--depth"):
        ckpt.check_config(meta, other.to_dict(), folder)
    with pytest.raises(CheckpointError, match="does not fit this model"):
        ckpt.load_model_state(GPT(other), ckpt.load_checkpoint("base")["model"], folder)


def test_world_size_mismatch_names_the_torchrun_flag():
    model, opt, config = trained_pair()
    folder = save(model, opt, config, 1)
    meta = ckpt.read_meta(folder)
    meta["world_size"] = 2
    paths.atomic_write_text(folder / "meta.json", json.dumps(meta))
    with pytest.raises(CheckpointError, match="nproc_per_node=2"):
        ckpt.load_checkpoint("base", "d2")
    assert ckpt.load_checkpoint("base", "d2", load_optimizer=False)["optimizer"] is None


def test_compiled_prefix_is_stripped():
    model, opt, config = trained_pair()
    state = {f"_orig_mod.{k}": v for k, v in model.state_dict().items()}
    fresh = GPT(config)
    ckpt.load_model_state(fresh, state, "memory")
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))


def test_load_casts_parameters_but_keeps_rotary_tables_fp32():
    model, opt, config = trained_pair()
    save(model, opt, config, 1)
    rebuilt = ckpt.load("base", dtype=torch.bfloat16).model
    assert {p.dtype for p in rebuilt.parameters()} == {torch.bfloat16}
    assert rebuilt.cos.dtype == torch.float32
    x = torch.randint(0, config.vocab_size, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), model(x), atol=0.1, rtol=0.05)


def test_load_reads_the_optimizer_shard_and_overrides_the_context():
    model, opt, config = trained_pair()
    save(model, opt, config, 2)
    loaded = ckpt.load("base", optimizer=True, max_seq_len=32)
    assert loaded.model.config.sequence_len == 32
    assert loaded.optimizer["state"].keys() == opt.state_dict()["state"].keys()


def test_a_checkpoint_of_another_tokenizer_is_one_clear_error():
    model, opt, config = trained_pair()
    save(model, opt, config, 1)
    other = tiny_tokenizer(vocab_size=300)
    other.save(paths.tokenizer_dir())
    with pytest.raises(CheckpointError, match=r"trained with a 320-token tokenizer but .* holds a 300-token one"):
        ckpt.load("base")
