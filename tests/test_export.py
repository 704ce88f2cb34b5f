"""chatforge/export.py: transformers computes what our GPT computes, tokenizes and templates as we do,
and export -> import gives back the same checkpoint bit for bit."""

import json
import random
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, NanoChatConfig, NanoChatForCausalLM
from transformers.cache_utils import DynamicCache

from chatforge.cli import main as cli_main
from chatforge.conversation import render_conversation, render_for_completion
from chatforge.export import read_export, to_hf_state, write_export
from chatforge.infer.engine import Engine
from chatforge.model.checkpoint import load_checkpoint
from chatforge.model.gpt import GPT, GPTConfig, KVCache
from chatforge.tokenizer import load_tokenizer
from tiny_chat import WORDS, save_tiny_checkpoint, tiny_model, tiny_tokenizer

TOL = 1e-4


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def make_model(tok, pattern: str, extra_rows: int = 0, seed: int = 0) -> GPT:
    """tests/tiny_chat's model (2 layers, GQA, window 16 on a 64-token context) with another pattern/vocab."""
    base = tiny_model(tok.vocab_size + extra_rows, sequence_len=64, seed=seed)
    model = GPT(GPTConfig(**{**base.config.to_dict(), "window_pattern": pattern}))
    model.load_state_dict(base.state_dict())
    return model.eval()


def export(tmp_path, model, tok, name="out"):
    out = tmp_path / name
    remote = write_export(out, model.state_dict(), model.config, tok, {})
    hf = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=remote, dtype=torch.float32).eval()
    return out, remote, hf


@pytest.mark.parametrize("pattern", ["L", "SL"])
def test_logits_equal_without_cache(tmp_path, tok, pattern):
    model = make_model(tok, pattern)
    _, remote, hf = export(tmp_path, model, tok)
    # all-L models use the built-in class; a sliding layer needs our modeling file
    assert remote == (pattern == "SL")
    assert (type(hf) is NanoChatForCausalLM) == (pattern == "L")
    gen = torch.Generator().manual_seed(0)
    for T in (1, 5, 16, 17, 40, 64):  # across the S layer's 16-token window and up to the full context
        ids = torch.randint(0, tok.vocab_size, (2, T), generator=gen)
        with torch.no_grad():
            ours, theirs = model(ids), hf(ids, use_cache=False).logits
        assert (ours - theirs).abs().max().item() <= TOL, T


@pytest.mark.parametrize("pattern", ["L", "SL"])
def test_logits_equal_with_kv_cache(tmp_path, tok, pattern):
    model = make_model(tok, pattern)
    _, _, hf = export(tmp_path, model, tok)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, tok.vocab_size, (1, 50), generator=gen)
    for prefill in (1, 7, 20):
        ours_cache, theirs_cache = KVCache(model.config, 1, 64, "cpu"), DynamicCache(config=hf.config)
        chunks = [ids[:, :prefill]] + [ids[:, t:t + 1] for t in range(prefill, 50)]
        with torch.no_grad():
            for chunk in chunks:  # one prefill, then one token at a time past the window
                ours = model(chunk, kv_cache=ours_cache)
                theirs = hf(chunk, cache=theirs_cache, use_cache=True).logits
                assert (ours - theirs).abs().max().item() <= TOL, (prefill, chunk.shape)


@pytest.mark.parametrize("pattern", ["L", "SL"])
def test_greedy_generate_equals_engine(tmp_path, tok, pattern):
    # 7 padded rows: the engine never picks them, and the export's suppress_tokens says the same
    model = make_model(tok, pattern, extra_rows=7, seed=3)
    _, _, hf = export(tmp_path, model, tok)
    assert hf.generation_config.suppress_tokens == list(range(tok.vocab_size, tok.vocab_size + 7))
    engine = Engine(model, tok, "cpu")
    for text in ("hello how are you", "the cat sat on a mat and the dog ran to it while we said"):
        prompt = [tok.bos_id] + tok.encode(text)
        ours = engine.generate_batch([prompt], max_tokens=32, temperature=0.0, use_tools=False,
                                     ignore_stops=True)[0].tokens
        with torch.no_grad():
            out = hf.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False,
                              eos_token_id=None, attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
        assert out[0, len(prompt):].tolist() == ours


def random_texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    alphabet = list(" \n\t\r") + list("abcxyzABC0123456789.,:;'\"!?()[]+-*/=_") + \
        ["é", "世界", "🙂", "\u00a0", "ß", "'s", "'LL", "  ", "\n\n", "1234567"]
    return ["".join(rng.choice(alphabet + [w + " " for w in WORDS]) for _ in range(rng.randint(0, 50)))
            for _ in range(n)]


def test_tokenizer_encodes_and_decodes_as_ours(tmp_path, tok):
    out = tmp_path / "out"
    write_export(out, make_model(tok, "L").state_dict(), make_model(tok, "L").config, tok, {})
    hf_tok = AutoTokenizer.from_pretrained(out)
    for text in random_texts(1500):
        ids = tok.encode(text)
        assert hf_tok.encode(text, add_special_tokens=False) == ids, repr(text)
        assert hf_tok.decode(ids) == tok.decode(ids)
        # plain text gets the BOS every training document starts with
        assert hf_tok(text)["input_ids"] == [tok.bos_id] + ids
    for name, i in tok.special_tokens.items():
        assert hf_tok.convert_tokens_to_ids(name) == i
    assert hf_tok.bos_token_id == tok.bos_id and hf_tok.eos_token_id == tok.special_id("<|assistant_end|>")


CONVERSATIONS = [
    {"messages": [{"role": "user", "content": "hello how are you"}, {"role": "assistant", "content": "yes 42"}]},
    {"messages": [
        {"role": "system", "content": "answer is yes"},
        {"role": "user", "content": "what is 2 + 3 * sqrt(42)?"},
        {"role": "assistant", "content": [
            {"type": "text", "text": "Let me compute: "},
            {"type": "python", "text": "import math\nprint(2 + 3 * math.sqrt(42))"},
            {"type": "python_output", "text": "21.44222555",},
            {"type": "text", "text": " so the answer is 21.44 \n"},
        ]},
        {"role": "user", "content": "and the dog?  \n\n"},
        {"role": "assistant", "content": "the dog ran to it 🙂"},
        {"role": "user", "content": "ok"},
    ]},
    {"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": [
        {"type": "python", "text": "1+1"}, {"type": "python_output", "text": "2"}]}]},
]


def test_chat_template_renders_as_ours(tmp_path, tok):
    out = tmp_path / "out"
    write_export(out, make_model(tok, "L").state_dict(), make_model(tok, "L").config, tok, {})
    hf_tok = AutoTokenizer.from_pretrained(out)

    def template(messages, **kw):
        return list(hf_tok.apply_chat_template(messages, tokenize=True, return_dict=True, **kw)["input_ids"])

    for conversation in CONVERSATIONS:
        messages = conversation["messages"]
        assert template(messages) == render_conversation(tok, conversation)[0]
        # a prompt for the next reply: ours drops a trailing assistant turn, transformers' callers do
        prompt = messages if messages[-1]["role"] == "user" else messages[:-1]
        assert template(prompt, add_generation_prompt=True) == render_for_completion(tok, conversation)
    with pytest.raises(Exception, match="alternate"):
        template([{"role": "assistant", "content": "hi"}])


def test_fused_model_exports_the_same_weights(tok):
    model = make_model(tok, "SL")
    expected = to_hf_state(model.state_dict(), model.config)
    fused = to_hf_state(make_model(tok, "SL").fuse_for_inference("none").state_dict(), model.config)
    assert expected.keys() == fused.keys()
    assert all(torch.equal(expected[k], fused[k]) for k in expected)


def test_export_then_import_is_bit_identical(tmp_path, chatforge_home, monkeypatch, tok):
    saved_tok, _ = save_tiny_checkpoint("sft", "d2", sequence_len=64)
    cli_main(["export", "--source", "sft", "--tag", "d2", "--out", str(tmp_path / "exp")])
    cli_main(["import", "--from", str(tmp_path / "exp"), "--tag", "back"])
    before = load_checkpoint("sft", "d2", load_optimizer=False)
    after = load_checkpoint("sft", "back", load_optimizer=False)
    assert before["model"].keys() == after["model"].keys()
    for k, v in before["model"].items():
        assert v.dtype == after["model"][k].dtype and torch.equal(v, after["model"][k]), k
    for key in ("model_config", "step", "vocab_size", "stage"):
        assert before["meta"][key] == after["meta"][key], key
    assert Engine.from_checkpoint("sft", "back", device="cpu").config == GPTConfig(**before["meta"]["model_config"])

    # into a fresh base directory: the tokenizer comes along and is the same tokenizer
    fresh = tmp_path / "fresh_home"
    monkeypatch.setenv("CHATFORGE_HOME", str(fresh))
    cli_main(["import", "--from", str(tmp_path / "exp"), "--tag", "t", "--stage", "base"])
    imported = load_tokenizer()
    assert imported.mergeable_ranks == saved_tok.mergeable_ranks and imported.pattern == saved_tok.pattern
    assert torch.equal(load_checkpoint("base", "t", load_optimizer=False)["model"]["lm_head.weight"],
                       before["model"]["lm_head.weight"])


def test_import_of_a_model_saved_by_transformers(tmp_path, tok):
    """A NanoChat folder written by transformers itself (as published models are): same logits after import."""
    cfg = NanoChatConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    hf = NanoChatForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0.0, 0.3)
    hf.save_pretrained(tmp_path / "theirs")
    ours_dir = tmp_path / "ours"
    write_export(ours_dir, make_model(tok, "L").state_dict(), make_model(tok, "L").config, tok, {})
    (tmp_path / "theirs" / "tokenizer.json").write_text((ours_dir / "tokenizer.json").read_text())
    config, state, _, _ = read_export(tmp_path / "theirs")
    model = GPT(config)
    model.load_state_dict(state, strict=False)
    ids = torch.randint(0, tok.vocab_size, (2, 30), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        # their RMSNorm eps is 1e-6 where ours is float32's 1.2e-7: still far inside the tolerance
        assert (model.eval()(ids) - hf(ids).logits).abs().max().item() <= TOL


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "chatforge", *args], capture_output=True, text=True, timeout=120,
                          env=env)


def one_line_error(out, *fragments):
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("chatforge: error:"), out.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_cli_errors_are_one_line(tmp_path, chatforge_home):
    one_line_error(run_cli("export", "--out", str(tmp_path / "x")), "no sft checkpoints")
    save_tiny_checkpoint("sft", "d2", sequence_len=64)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "file").write_text("x")
    one_line_error(run_cli("export", "--out", str(busy)), "--out", "not empty")
    one_line_error(run_cli("import", "--from", str(busy), "--tag", "t"), "not a NanoChat export")
    (busy / "config.json").write_text(json.dumps({"model_type": "llama"}))
    one_line_error(run_cli("import", "--from", str(busy), "--tag", "t"), "not a NanoChat export")
    one_line_error(run_cli("import", "--from", str(tmp_path / "nowhere"), "--tag", "t"), "is not a folder")
    assert run_cli("export", "--tag", "d2", "--out", str(tmp_path / "exp")).returncode == 0
    one_line_error(run_cli("import", "--from", str(tmp_path / "exp"), "--tag", "d2"), "already exists")
    # a base directory whose tokenizer is another one: the model's is kept beside it, under a name
    tiny_tokenizer(vocab_size=300).save(chatforge_home / "tokenizer")
    assert run_cli("import", "--from", str(tmp_path / "exp"), "--tag", "new").returncode == 0
    assert load_checkpoint("sft", "new", load_optimizer=False)["meta"]["tokenizer"] == "import-new"
    assert load_tokenizer().vocab_size == 300  # the base directory's own is untouched, still the current one
