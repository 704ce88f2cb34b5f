"""Identity conversations: deterministic by seed, varied, carrying the model's real size, renderable."""

from chatforge.conversation import render_conversation
from chatforge.tasks.custom import validate_training_conversation
from chatforge.tasks.identity import Identity, facts_from_model, human_count
from chatforge.tokenizer import Tokenizer


def test_deterministic_by_seed_and_varied():
    a, b, c = Identity(50, seed=3), Identity(50, seed=3), Identity(50, seed=4)
    assert list(a) == list(b)
    assert list(a) != list(c)
    questions = {m["content"] for conv in a for m in conv["messages"] if m["role"] == "user"}
    answers = {m["content"] for conv in a for m in conv["messages"] if m["role"] == "assistant"}
    assert len(questions) > 15 and len(answers) > 8
    for conv in a:
        validate_training_conversation(conv)


def test_size_comes_from_the_model():
    assert human_count(561_123_456) == "about 561 million"
    assert human_count(1_250_000_000) == "about 1.2 billion"
    facts = facts_from_model({"n_layer": 20, "sequence_len": 2048}, 561_123_456, name="Forgey")
    texts = [m["content"] for conv in Identity(200, facts) for m in conv["messages"]]
    size_answers = [t for t in texts if "parameters" in t and "about 561 million" in t]
    assert size_answers and all("20 layers" in t and "2048 tokens" in t for t in size_answers)
    assert any("Forgey" in t for t in texts)


def test_renders_and_decodes_back():
    convs = list(Identity(20, seed=1))
    tok = Tokenizer.train(iter([m["content"] for c in convs for m in c["messages"]] * 3), 300)
    for conv in convs:
        ids, mask = render_conversation(tok, conv)
        trained = tok.decode([i for i, m in zip(ids, mask) if m])
        replies = "".join(m["content"] + "<|assistant_end|>" for m in conv["messages"] if m["role"] == "assistant")
        assert trained == replies
