"""data.encode and data.prepare: which tokens are trained, with the tokenizer's own chat template (ChatML as Qwen
renders it, Llama 3), for every record format; streaming through worker processes gives the in-memory rows."""
import json

import pytest
import torch

from horizon_triton import data
from horizon_triton.data import IGNORE_INDEX
from tiny_tokenizers import make_tokenizer

CHAT = [{"role": "system", "content": "you are a bot ."},
        {"role": "user", "content": "what color is the sky ?"},
        {"role": "assistant", "content": "blue ."},
        {"role": "user", "content": "how many legs has a cat ?"},
        {"role": "assistant", "content": " four legs . "}]     # spaces: Llama 3's template trims, ChatML keeps them


def _trained(ids, labels):
    return [i for i, label in zip(ids, labels) if label != IGNORE_INDEX]


def _assistant_tokens(tokenizer, messages, strip: bool):
    """What the loss must count, built independently: each assistant content's own tokens + the end-of-turn."""
    out = []
    for m in messages:
        if m["role"] == "assistant":
            content = m["content"].strip() if strip else m["content"]
            out += tokenizer(content, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return out


@pytest.mark.parametrize("style", ["chatml", "llama3"])
def test_chat_trains_assistant_turns_and_their_end_of_turn_only(style):
    tokenizer = make_tokenizer(style=style)
    ids, labels = data.encode_record({"messages": CHAT}, tokenizer)
    # the ids are the template's own tokenization of the conversation
    assert ids == tokenizer.apply_chat_template(CHAT, tokenize=True, return_dict=True)["input_ids"]
    assert _trained(ids, labels) == _assistant_tokens(tokenizer, CHAT, strip=style == "llama3")
    assert all(label in (IGNORE_INDEX, i) for i, label in zip(ids, labels))
    # nothing of the system and user turns, the headers or ChatML's newline after <|im_end|> is trained
    text_of_trained = tokenizer.decode(_trained(ids, labels))
    assert "sky" not in text_of_trained and "bot" not in text_of_trained and "assistant" not in text_of_trained
    all_ids, all_labels = data.encode_record({"messages": CHAT}, tokenizer, train_on="all")
    assert all_ids == ids and all_labels == ids


@pytest.mark.parametrize("style", ["chatml", "llama3"])
def test_every_conversation_format_encodes_as_its_messages(style):
    tokenizer = make_tokenizer(style=style)
    user, answer = "what color is the grass ?", "green ."
    messages = {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}
    expected = data.encode_record(messages, tokenizer)
    lines = [{"prompt": user, "response": answer},
             {"instruction": user, "output": answer},
             {"conversations": [{"from": "human", "value": user}, {"from": "gpt", "value": answer}]}]
    for line in lines:
        assert data.encode_record(data.normalize(line, "test"), tokenizer) == expected, line
    assert _trained(*expected) == _assistant_tokens(tokenizer, messages["messages"], strip=True)


def test_text_and_prompt_response_without_a_template():
    tokenizer = make_tokenizer()                      # no chat template: <s> added, </s> appended
    assert tokenizer.chat_template is None
    ids, labels = data.encode_record({"text": "the cat sat ."}, tokenizer)
    assert ids == tokenizer("the cat sat .")["input_ids"] + [tokenizer.eos_token_id]
    assert _trained(ids, labels) == [i for i in ids if i != tokenizer.bos_token_id]
    record = {"prompt": "what did the dog do ?", "response": "the dog ran ."}
    ids, labels = data.encode_record(record, tokenizer)
    joined = record["prompt"] + data.PROMPT_RESPONSE_SEPARATOR + record["response"]
    assert ids == tokenizer(joined)["input_ids"] + [tokenizer.eos_token_id]
    assert _trained(ids, labels) == tokenizer("the dog ran .", add_special_tokens=False)["input_ids"] + [
        tokenizer.eos_token_id]
    with pytest.raises(ValueError, match="no chat template"):
        data.encode_record({"messages": CHAT}, tokenizer)


# 'the mat .' stands for Qwen3's think block, which only the last assistant turn keeps
QWEN3_LIKE = (
    "{% for m in messages %}{% if m['role'] == 'assistant' and loop.last %}"
    "<|im_start|>assistant\nthe mat .\n{{ m['content'] }}<|im_end|>\n"
    "{% else %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# Mistral's: the system prompt goes into the last user turn; an assistant turn ends with the eos
MISTRAL_LIKE = (
    "{% set system = messages[0]['content'] if messages[0]['role'] == 'system' else '' %}"
    "{% set turns = messages[1:] if system else messages %}"
    "{% set last_user = (turns | selectattr('role', 'eq', 'user') | list)[-1] %}"
    "{{ bos_token }}{% for m in turns %}{% if m['role'] == 'user' %} [INST] "
    "{% if system and m is sameas last_user %}{{ system }} {% endif %}{{ m['content'] }} [/INST]"
    "{% else %} {{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}")


@pytest.mark.parametrize("style,template,last_answer", [("chatml", QWEN3_LIKE, "the mat . four legs ."),
                                                        (None, MISTRAL_LIKE, "four legs .")])
def test_templates_that_render_a_turn_differently_later_on(style, template, last_answer):
    """A turn rendered as the conversation's last differs from the same turn with later turns after it (Qwen3)
    or the prefix before a turn changes once more turns follow (Mistral): such turns are found by rendering with
    their content empty. The last turn is what the model writes after the generation prompt (a think block too)."""
    tokenizer = make_tokenizer(style=style)
    tokenizer.chat_template = template
    ids, labels = data.encode_record({"messages": CHAT}, tokenizer)
    assert ids == tokenizer.apply_chat_template(CHAT, tokenize=True, return_dict=True)["input_ids"]
    end = tokenizer.eos_token_id
    words = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in ("blue .", last_answer)]
    assert _trained(ids, labels) == words[0] + [end] + words[1] + [end]


def test_a_failing_template_is_named():
    tokenizer = make_tokenizer(style="chatml")
    tokenizer.chat_template = "{{ raise_exception('roles must alternate user/assistant') }}"
    with pytest.raises(ValueError, match="the chat template refused the conversation: roles must alternate"):
        data.encode_record({"messages": CHAT}, tokenizer)


def _chat_lines(n):
    lines = []
    for i in range(n):
        answer = " ".join(["blue"] * (1 + i % 7)) + " ."
        lines.append({"messages": [{"role": "user", "content": "what color is the sky ?"},
                                   {"role": "assistant", "content": answer}]})
        if i % 5 == 0:
            lines.append({"text": "the cat sat on the mat ."})
    return lines


@pytest.fixture
def chat_file(tmp_path, monkeypatch):
    monkeypatch.setattr(data.packing, "CHUNK_LINES", 7)   # many chunks: the order across workers matters
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" + ("\n" if i % 9 == 0 else "") for i, r in enumerate(_chat_lines(60))))
    return path


def _all_rows(rows):
    return [{k: v.tolist() for k, v in rows[i].items()} for i in range(len(rows))]


def test_prepare_streams_the_rows_pack_documents_makes_in_memory(tmp_path, chat_file):
    tokenizer = make_tokenizer(style="chatml")
    records = data.read_jsonl(chat_file)
    expected = _all_rows(data.pack_documents(data.tokenize_records(records, tokenizer), 48, 0, too_long="drop"))
    for workers in (0, 2):
        out = tmp_path / f"rows{workers}"
        out.mkdir()
        prepared = data.prepare(chat_file, tokenizer, 48, 0, out, workers=workers, keep_examples=2)
        assert _all_rows(prepared.train) == expected, workers
        stats = prepared.stats["train"]
        assert stats.records == len(records) and stats.rows == len(expected)
        assert stats.trained_tokens == sum(sum(t != IGNORE_INDEX for t in r["labels"]) for r in expected)
        assert [n for n, _, _ in prepared.examples] == [1, 3]          # line numbers, blank line 2 skipped
        prepared.close()


def test_prepare_counts_and_drops_or_truncates_long_records(tmp_path, chat_file):
    tokenizer = make_tokenizer(style="chatml")
    lengths = [len(ids) for ids, _ in data.tokenize_records(data.read_jsonl(chat_file), tokenizer)]
    seq_len = sorted(lengths)[len(lengths) // 2]
    longer = sum(n > seq_len for n in lengths)
    assert longer > 0
    dropped = data.prepare(chat_file, tokenizer, seq_len, 0, too_long="drop").stats["train"]
    cut = data.prepare(chat_file, tokenizer, seq_len, 0, too_long="truncate").stats["train"]
    assert dropped.too_long == cut.too_long == longer and dropped.longest == max(lengths)
    assert dropped.tokens == sum(n for n in lengths if n <= seq_len)
    assert cut.tokens == sum(min(n, seq_len) for n in lengths)
    with pytest.raises(ValueError, match=rf"chat.jsonl:\d+ has \d+ tokens, more than --seq-len {seq_len}"):
        data.prepare(chat_file, tokenizer, seq_len, 0, too_long="error")


@pytest.mark.parametrize("preference", [False, True])
def test_a_huge_record_is_found_too_long_without_tokenizing_it_whole(tmp_path, preference):
    """A 10 MB line among short ones: dropped (or refused) after tokenizing a prefix of a few hundred characters,
    never the whole 10 MB; the other records are packed as if it were absent."""
    tokenizer = make_tokenizer(style="chatml")
    seq_len = 128 if preference else 32           # a pair's two sequences share a row
    huge = "the cat sat on the mat . " * 400_000
    if preference:
        short = {"prompt": "what did the dog do ?", "chosen": "it ran .", "rejected": "it sat ."}
        big = dict(short, chosen=huge)
    else:
        short = {"prompt": "what did the dog do ?", "response": "the dog ran under the rug ."}
        big = {"text": huge}
    path = tmp_path / "huge.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [short, big, short]))
    alone = tmp_path / "short.jsonl"
    alone.write_text("".join(json.dumps(r) + "\n" for r in [short, short]))
    longest = []                       # every text tokenized, through transformers or straight to the Rust batch
    call = type(tokenizer).__call__

    def measured(self, text, *args, **kwargs):
        longest.extend(len(t) for t in ([text] if isinstance(text, str) else text))
        return call(self, text, *args, **kwargs)

    class Backend:
        def __init__(self, inner):
            self.inner = inner

        def encode_batch(self, texts, *args, **kwargs):
            longest.extend(len(t) for t in texts)
            return self.inner.encode_batch(texts, *args, **kwargs)

        def __getattr__(self, name):
            return getattr(self.inner, name)
    type(tokenizer).__call__ = measured
    tokenizer._tokenizer = Backend(tokenizer._tokenizer)
    try:
        stats = data.prepare(path, tokenizer, seq_len, 0, preference=preference).stats["train"]
        with pytest.raises(ValueError, match=rf"huge.jsonl:2 has more than \d+ tokens, more than --seq-len {seq_len}"):
            data.prepare(path, tokenizer, seq_len, 0, too_long="error", preference=preference)
    finally:
        type(tokenizer).__call__ = call
        tokenizer._tokenizer = tokenizer._tokenizer.inner
    assert max(longest) < 20 * seq_len
    assert (stats.records, stats.too_long) == (3, 1) and stats.longest > seq_len
    expected = data.prepare(alone, tokenizer, seq_len, 0, preference=preference).stats["train"]
    assert (stats.rows, stats.tokens, stats.trained_tokens) == (expected.rows, expected.tokens, expected.trained_tokens)


def test_prepare_eval_split_and_errors(tmp_path, chat_file):
    tokenizer = make_tokenizer(style="chatml")
    prepared = data.prepare(chat_file, tokenizer, 64, 0, tmp_path, eval_fraction=0.25, seed=3)
    n = len(data.read_jsonl(chat_file))
    held = prepared.stats["eval"].records
    assert prepared.stats["train"].records + held == n and abs(held - 0.25 * n) <= 1
    assert len(prepared.eval) == prepared.stats["eval"].rows > 0
    assert [data.in_eval_split(i, 0.25, 3) for i in range(n)].count(True) == held
    bad = tmp_path / "bad.jsonl"
    lines = [json.dumps(r) for r in _chat_lines(30)]
    lines[17] = json.dumps({"messages": [{"role": "user", "content": "hi"}]})
    bad.write_text("\n".join(lines) + "\n")
    for workers in (0, 2):
        with pytest.raises(ValueError, match="bad.jsonl:18: the conversation has no assistant turn"):
            data.prepare(bad, tokenizer, 64, 0, workers=workers)


def test_evaluate_matches_the_transformers_loss(tmp_path):
    """Engine.evaluate over packed, padded batches = the token-weighted mean of transformers' cross-entropy over
    every document run on its own."""
    import horizon_triton as ht
    from hf_reference import make_hf_model
    model = make_hf_model("qwen2", tmp_path / "m")
    tokenizer = make_tokenizer(style="chatml")
    rows = data.pack_documents(data.tokenize_records([data.normalize(r, "t") for r in _chat_lines(12)], tokenizer),
                               40, 0, too_long="drop")
    loader = data.RowLoader(rows, batch_size=3, epochs=1, shuffle=False)
    engine = ht.Engine(ht.ModelConfig.from_pretrained(tmp_path / "m"),
                       ht.TrainConfig(device="cpu", compute_dtype="float32"))
    got = engine.evaluate(loader)
    engine.close()
    loss_sum, tokens = 0.0, 0
    with torch.no_grad():
        for batch in loader:
            for r in range(len(batch["input_ids"])):     # documents one by one: the reference needs no packing
                starts = (batch["position_ids"][r] == 0).nonzero().flatten().tolist() + [40]
                for a, b in zip(starts, starts[1:]):
                    doc_logits = model(input_ids=batch["input_ids"][r:r + 1, a:b]).logits[0]
                    targets = batch["labels"][r, a + 1:b]
                    loss_sum += torch.nn.functional.cross_entropy(doc_logits[:-1], targets, reduction="sum",
                                                                  ignore_index=IGNORE_INDEX).item()
                    tokens += int((targets != IGNORE_INDEX).sum())
    assert got == pytest.approx(loss_sum / tokens, rel=1e-5)
