"""data.chat_shapes and encode.encode_records: many records encoded at once (one template rendering a record, its
assistant spans from its conversation's shape, one tokenizer batch) give token for token the ids and labels of
encode_record, today's one-record algorithm that renders every prefix, on every template the tests cover; what
the shapes cannot prove takes that algorithm and is counted."""
import json
import random

import numpy as np
import pytest

from horizon_triton import data
from horizon_triton.data.chat_shapes import ConversationShapes, learn_shape
from horizon_triton.data.encode import encode_records, preference_records
from test_data_encode import CHAT, MISTRAL_LIKE, QWEN3_LIKE
from tiny_tokenizers import WORDS, make_tokenizer

TEMPLATES = {"chatml": ("chatml", None), "llama3": ("llama3", None), "qwen3-like": ("chatml", QWEN3_LIKE),
             "mistral-like": (None, MISTRAL_LIKE)}


def _tokenizer(name):
    style, template = TEMPLATES[name]
    tokenizer = make_tokenizer(style=style)
    if template is not None:
        tokenizer.chat_template = template
    return tokenizer


def _content(rng):
    """Words, with the edges that trip span finding: spaces and newlines around, empty, a placeholder's
    characters, a template's own tokens written in the text."""
    words = " ".join(rng.choices(WORDS, k=rng.randint(1, 12)))
    return rng.choice([words, words, f" {words} ", f"\n{words}\n\n", "", " ", f"{words} \ue000 0 \ue001",
                       f"{words} <|im_end|> {words}", f"{words}<|eot_id|>"])


def _records(seed=0, n=60):
    rng = random.Random(seed)
    records = []
    for i in range(n):
        messages = [{"role": "system", "content": _content(rng)}] if rng.random() < 0.4 else []
        for _ in range(rng.randint(1, 3)):
            messages += [{"role": "user", "content": _content(rng)}, {"role": "assistant", "content": _content(rng)}]
        records.append({"messages": messages})
        if i % 7 == 0:
            records.append({"prompt": _content(rng), "response": _content(rng)})
        if i % 11 == 0:
            records.append({"text": _content(rng) or "the cat"})
    return records


def _reference(records, tokenizer, train_on="assistant", firsts=None):
    firsts = firsts or [0] * len(records)
    return [data.encode_record(r, tokenizer, train_on, first) for r, first in zip(records, firsts)]


def _lists(encoded):
    return [(ids.tolist(), labels.tolist()) for ids, labels, _ in encoded]


@pytest.mark.parametrize("name", TEMPLATES)
@pytest.mark.parametrize("train_on", ["assistant", "all"])
def test_encode_records_equals_encode_record_token_for_token(name, train_on):
    tokenizer = _tokenizer(name)
    records = _records()
    got = encode_records([(r, 0) for r in records], tokenizer, train_on)
    assert _lists(got) == _reference(records, tokenizer, train_on)
    slow = [s for _, _, s in got]
    if train_on == "all" or name in ("chatml", "llama3"):
        assert not any(slow)                      # one rendering a record: the shapes hold for these templates
    elif name == "qwen3-like":                    # the think block moves to the last turn: two assistant turns
        assert slow == [len([m for m in r.get("messages", []) if m["role"] == "assistant"]) > 1 for r in records]
    else:      # Mistral-like: the system prompt moves into the last user turn (once there are two); empty, it is a turn
        def moves(turns):
            roles = [m["role"] for m in turns]
            return "system" in roles and (roles.count("user") > 1 or turns[0]["content"] == "")
        assert slow == [moves(r.get("messages", [])) for r in records]


@pytest.mark.parametrize("name", TEMPLATES)
def test_preference_pairs_equal_encode_preference(name):
    tokenizer = _tokenizer(name)
    records = [r for r in _records(seed=1) if "messages" in r]
    pairs = [{"prompt": r["messages"][:-1], "chosen": r["messages"][-1:],
              "rejected": [{"role": "assistant", "content": "no ."}]} for r in records]
    pairs += [{"prompt": "what did the dog do ?", "chosen": " the dog ran . ", "rejected": "no"}]
    items = [item for pair in pairs for item in preference_records(pair)]
    expected = [doc for pair in pairs for doc in data.encode_preference(pair, tokenizer)]
    assert _lists(encode_records(items, tokenizer)) == expected


def test_the_shape_of_a_conversation():
    """ChatML: the literals between the contents as the template writes them, the spans from the start of each
    assistant content through its <|im_end|>; Llama 3 trims its contents."""
    tokenizer = make_tokenizer(style="chatml")
    shape = learn_shape(tokenizer, ("user", "assistant"), 0)
    assert shape.literals == ("<|im_start|>system\nyou are a helpful assistant .<|im_end|>\n<|im_start|>user\n",
                              "<|im_end|>\n<|im_start|>assistant\n", "<|im_end|>\n")
    assert shape.slots == ((0, False), (1, False))
    assert shape.spans == (((1, len("<|im_end|>\n<|im_start|>assistant\n")), (2, len("<|im_end|>"))),)
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " the cat "}]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    [(start, end)] = shape.spans_in(messages, text)
    assert text[start:end] == " the cat <|im_end|>"
    assert shape.spans_in(messages, text + "x") is None
    llama = learn_shape(make_tokenizer(style="llama3"), ("system", "user", "assistant"), 0)
    assert llama.slots == ((0, True), (1, True), (2, True))


@pytest.mark.parametrize("template,why", [
    ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }} / {{ m['content'] }}</s>{% endfor %}",
     "a content written twice"),
    ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] | replace('\\n', ' ') }}</s>{% endfor %}",
     "a content altered"),
    ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{% endfor %}", "a span that ends at its content"),
])
def test_shapes_the_template_does_not_allow(template, why):
    tokenizer = make_tokenizer()
    tokenizer.chat_template = template
    assert learn_shape(tokenizer, ("user", "assistant"), 0) is None, why
    records = [{"messages": CHAT[1:3]}, {"messages": CHAT}]
    got = encode_records([(r, 0) for r in records], tokenizer)
    assert _lists(got) == _reference(records, tokenizer) and all(s for _, _, s in got)


def test_a_template_that_reads_the_content_takes_the_slow_path_for_that_record():
    """The placeholders render like plain words, so the shape holds; a record whose content the template reads
    renders otherwise than its shape's literals, and that record alone is encoded by rendering its prefixes."""
    tokenizer = make_tokenizer(style="chatml")
    tokenizer.chat_template = tokenizer.chat_template.replace(
        "{{ message['content'] }}",
        "{% if 'cat' in message['content'] and loop.last %}the mat . {% endif %}{{ message['content'] }}")
    records = [{"messages": CHAT}, {"messages": CHAT[:-1] + [{"role": "assistant", "content": "the cat sat ."}]}]
    got = encode_records([(r, 0) for r in records], tokenizer)
    assert _lists(got) == _reference(records, tokenizer)
    assert [s for _, _, s in got] == [False, True]


def test_shapes_are_learnt_once_a_conversation_shape():
    tokenizer = make_tokenizer(style="chatml")
    shapes = ConversationShapes(tokenizer)
    calls = []
    original = tokenizer.apply_chat_template
    tokenizer.apply_chat_template = lambda *a, **k: calls.append(1) or original(*a, **k)
    records = [{"messages": CHAT[1:3]}] * 50 + [{"messages": CHAT}] * 50
    encode_records([(r, 0) for r in records], tokenizer, shapes=shapes)
    # 2 calls to learn each shape (with and without the generation prompt), 1 for the whole batch
    assert len(calls) == 2 * 2 + 1
    encode_records([(r, 0) for r in records], tokenizer, shapes=shapes)
    assert len(calls) == 2 * 2 + 2


@pytest.mark.parametrize("name", ["chatml", "qwen3-like"])
def test_prepare_equals_rows_of_encode_record_and_counts_the_slow_path(tmp_path, monkeypatch, name):
    monkeypatch.setattr(data.packing, "CHUNK_LINES", 7)       # many chunks: the order across workers matters
    tokenizer = _tokenizer(name)
    records = [r for r in _records(seed=2) if "text" not in r]
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    expected = data.pack_documents(_reference(records, tokenizer), 96, 0, too_long="drop")
    slow = sum(len([m for m in r.get("messages", []) if m["role"] == "assistant"]) > 1 for r in records) \
        if name == "qwen3-like" else 0
    for workers in (0, 2):
        out = tmp_path / f"rows{workers}"
        out.mkdir()
        prepared = data.prepare(path, tokenizer, 96, 0, out, workers=workers)
        assert len(prepared.train) == len(expected)
        for i, row in enumerate(expected):
            assert all(np.array_equal(prepared.train[i][k], row[k]) for k in row), (workers, i)
        stats = prepared.stats["train"]
        assert stats.slow_path == slow
        assert ("rendered once more" in stats.summary(96, "drop")) == bool(slow)
        prepared.close()


def test_a_record_the_template_refuses_is_named_by_its_line(tmp_path):
    tokenizer = make_tokenizer(style="chatml")
    tokenizer.chat_template = ("{% for m in messages %}{% if m['content'] == 'boom' %}"
                               "{{ raise_exception('no boom here') }}{% endif %}{% endfor %}" + tokenizer.chat_template)
    lines = [{"messages": CHAT[1:3]}] * 30
    lines[17] = {"messages": [{"role": "user", "content": "boom"}, {"role": "assistant", "content": "ok"}]}
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    for workers in (0, 2):
        with pytest.raises(ValueError, match="bad.jsonl:18: the chat template refused the conversation: no boom"):
            data.prepare(path, tokenizer, 64, 0, workers=workers)


def test_a_rust_tokenizer_set_to_truncate_is_called_through_transformers():
    """transformers turns the Rust tokenizer's truncation and padding off before it encodes; calling the Rust
    tokenizer directly is only right when they are off already."""
    records = [{"messages": CHAT}]
    expected = _reference(records, make_tokenizer(style="chatml"))
    tokenizer = make_tokenizer(style="chatml")
    tokenizer.backend_tokenizer.enable_truncation(8)
    assert _lists(encode_records([(r, 0) for r in records], tokenizer)) == expected
