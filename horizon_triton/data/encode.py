"""Records -> token ids and labels: which tokens count for the loss.

A record is rendered to one string plus the character spans that are trained, then tokenized once with offsets;
a token is trained when it starts inside a span (labels -100 elsewhere).

    text             the string with the tokenizer's special tokens (e.g. BOS) and its eos appended; all trained
    prompt/response  with a chat template: the conversation [user: prompt, assistant: response], as messages;
                     without one: prompt + PROMPT_RESPONSE_SEPARATOR + response + eos, the response and eos trained
    messages         the tokenizer's own chat template (apply_chat_template), no special tokens added beyond it.
                     Assistant turns are trained: their content and their end-of-turn token.

Finding the assistant spans without {% generation %} markers: for assistant turn k, the rendering of
messages[:k] with add_generation_prompt=True ends where the turn's content starts, and the rendering of
messages[:k+1] ends after its end-of-turn token (trailing whitespace, e.g. ChatML's newline, left out). Both must
be prefixes of the whole conversation's rendering, as they are for ChatML (Qwen2/2.5) and Llama 3 templates (both
tested). Where they are not (a template that renders a turn differently once later turns follow: Qwen3's adds an
empty think block to the last turn only; Mistral's moves the system prompt into the last user turn), the turn's
content is located by rendering the conversation once more with that content left empty (the two renderings
differ exactly there), and the tokenizer's eos token is trained too when the template writes it right after.
``train_on="all"`` trains every token of the rendering instead.

Preference pairs (``encode_preference``): the chosen and the rejected each become one sequence, the prompt then
the response, rendered as above: three strings as a {"prompt", "response"} record each, turns as the
conversation prompt + response with only the response's assistant turns trained (``first_trained_turn``).

Many records at once (``encode_records``, what data preparation uses): the same ids and labels, token for token,
with one rendering a record where chat_shapes can prove the spans from the conversation's shape (else the prefix
renderings above: the slow path, reported per record), and one call of the fast tokenizer for all the texts.
encode_record stays the one-record reference.
"""
from __future__ import annotations

import os
from itertools import chain
from pathlib import Path

import numpy as np

from horizon_triton.kernels.reference import IGNORE_INDEX

from .chat_shapes import ConversationShapes, render_conversations

PROMPT_RESPONSE_SEPARATOR = "\n"
TRAIN_ON = ("assistant", "all")


def render(record: dict, tokenizer, train_on: str = "assistant",
           first_trained_turn: int = 0) -> tuple[str, list[tuple[int, int]], bool, bool]:
    """(text, trained character spans, add the tokenizer's special tokens?, append eos?) of one record; in a
    conversation, assistant turns before ``first_trained_turn`` are not trained (a preference pair's prompt)."""
    if "text" in record:
        return record["text"], [(0, len(record["text"]))], True, True
    has_template = getattr(tokenizer, "chat_template", None) is not None
    if "prompt" in record and not has_template:
        text = record["prompt"] + PROMPT_RESPONSE_SEPARATOR + record["response"]
        start = 0 if train_on == "all" else len(text) - len(record["response"])
        return text, [(start, len(text))], True, True
    if not has_template:
        raise ValueError("the tokenizer has no chat template (tokenizer.chat_template), which conversation "
                         "records need; set one, or write the data as {\"text\": ...} lines")
    messages = conversation(record)
    text = _apply(tokenizer, messages, False)
    if train_on == "all":
        return text, [(0, len(text))], False, False
    spans = []
    for k, message in enumerate(messages):
        if message["role"] != "assistant" or k < first_trained_turn:
            continue
        before = _apply(tokenizer, messages[:k], True) if k else ""
        through = (text if k == len(messages) - 1 else _apply(tokenizer, messages[:k + 1], False)).rstrip()
        if through.startswith(before) and text.startswith(through):
            spans.append((len(before), len(through)))
        else:
            spans.append(_span_by_blanking(tokenizer, messages, k, text))
    return text, spans, False, False


def _span_by_blanking(tokenizer, messages: list[dict], k: int, text: str) -> tuple[int, int]:
    """Where turn k's content sits in ``text``: the stretch by which it differs from the rendering with that
    content empty, extended over the eos token when the template writes it right after."""
    other = _apply(tokenizer, [dict(m, content="") if n == k else m for n, m in enumerate(messages)], False)
    start = len(os.path.commonprefix([text, other]))
    end = len(text) - len(os.path.commonprefix([text[start:][::-1], other[start:][::-1]]))
    eos = tokenizer.eos_token
    if end > start and eos and text.startswith(eos, end):
        end += len(eos)
    return start, end


def _apply(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as e:  # noqa: BLE001 - templates raise their own errors (e.g. roles that must alternate)
        raise ValueError(f"the chat template refused the conversation: {e}") from None


def conversation(record: dict) -> list[dict]:
    """The turns of a {"messages"} or {"prompt", "response"} record."""
    return record.get("messages") or [{"role": "user", "content": record["prompt"]},
                                      {"role": "assistant", "content": record["response"]}]


def encode_record(record: dict, tokenizer, train_on: str = "assistant",
                  first_trained_turn: int = 0) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one record; labels are the ids where trained, -100 elsewhere."""
    if train_on not in TRAIN_ON:
        raise ValueError(f"train_on {train_on!r}: choose one of {', '.join(TRAIN_ON)}")
    text, spans, special, add_eos = render(record, tokenizer, train_on, first_trained_turn)
    encoded = _tokenize(tokenizer, text, special)
    ids = list(encoded["input_ids"])
    offsets = np.array(encoded["offset_mapping"], dtype=np.int64).reshape(-1, 2)      # [tokens, (start, end)]
    labels = np.where(_trained(offsets, spans), ids, IGNORE_INDEX).tolist()
    if add_eos and tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
        labels.append(tokenizer.eos_token_id)
    return ids, labels


def _tokenize(tokenizer, text, special: bool):
    """The tokenizer's encoding of a text (or a list of texts, in one call) with character offsets."""
    try:
        return tokenizer(text, add_special_tokens=special, return_offsets_mapping=True)
    except NotImplementedError:
        raise ValueError("the tokenizer gives no character offsets (a slow tokenizer); save the model's fast "
                         "tokenizer (tokenizer.json) with it") from None


def _trained(offsets: np.ndarray, spans: list[tuple[int, int]]) -> np.ndarray:
    """Which tokens (offsets [tokens, (start, end)]) start inside a span and cover a character."""
    if not spans:
        return np.zeros(len(offsets), dtype=bool)
    starts = np.array([a for a, _ in spans], dtype=np.int64)
    ends = np.array([b for _, b in spans], dtype=np.int64)
    span = np.searchsorted(starts, offsets[:, 0], side="right") - 1                  # the span starting last before
    return (span >= 0) & (offsets[:, 0] < ends[span]) & (offsets[:, 1] > offsets[:, 0])


def _encodes_as_the_fast_base_class(tokenizer) -> bool:
    """Whether the tokenizer's class leaves transformers' fast encoding as it is (a few, e.g. CodeLlama's and
    LayoutLM's, add their own steps)."""
    import transformers
    base = transformers.PreTrainedTokenizerFast
    return isinstance(tokenizer, base) and all(
        getattr(type(tokenizer), name) is getattr(base, name)
        for name in ("__call__", "_call_one", "encode_plus", "batch_encode_plus", "_encode_plus", "_batch_encode_plus")
        if hasattr(base, name))


def _encodings(tokenizer, texts: list[str], special: bool) -> list[tuple[np.ndarray, np.ndarray]]:
    """(ids [tokens], offsets [tokens, 2]) of each text, from one batch of the fast tokenizer: its Rust tokenizer
    called as transformers calls it (no truncation, no padding, special tokens split as the tokenizer says), without
    transformers' conversion of every field to Python lists; through transformers where the Rust tokenizer is set
    otherwise."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if (backend is not None and _encodes_as_the_fast_base_class(tokenizer) and backend.truncation is None
            and backend.padding is None
            and getattr(backend, "encode_special_tokens", False) == bool(getattr(tokenizer, "split_special_tokens",
                                                                                  False))):
        return [(np.array(e.ids, dtype=np.int64),
                 np.fromiter(chain.from_iterable(e.offsets), np.int64, 2 * len(e)).reshape(-1, 2))
                for e in backend.encode_batch(texts, add_special_tokens=special)]
    encoded = _tokenize(tokenizer, texts, special)
    return [(np.array(ids, dtype=np.int64), np.array(offsets, dtype=np.int64).reshape(-1, 2))
            for ids, offsets in zip(encoded["input_ids"], encoded["offset_mapping"])]


def preference_records(pair: dict) -> list[tuple[dict, int]]:
    """(record, first trained turn) of the chosen and of the rejected sequence of a normalized preference pair."""
    if isinstance(pair["prompt"], str):
        return [({"prompt": pair["prompt"], "response": pair[key]}, 0) for key in ("chosen", "rejected")]
    return [({"messages": pair["prompt"] + pair[key]}, len(pair["prompt"])) for key in ("chosen", "rejected")]


PREFIX_CHARS_PER_TOKEN = 16      # exceeds() tokenizes at most this many characters a token of the limit
PREFIX_MARGIN = 8                # tokens a prefix's cut may add (its last word split otherwise than in the whole)


def exceeds(record: dict, tokenizer, limit: int) -> int:
    """A lower bound on the tokens of a record when it certainly encodes to more than ``limit`` tokens, else 0,
    deciding on its first PREFIX_CHARS_PER_TOKEN x limit characters: a record of megabytes is never tokenized
    whole only to be dropped (a 10 MB line took gigabytes of offsets). Records shorter than that, and those whose
    prefix holds few tokens (a tokenizer with very long tokens, or an unknown-word token), give 0 and are
    encoded whole."""
    cut = PREFIX_CHARS_PER_TOKEN * (limit + 1)
    if characters(record) <= cut:
        return 0
    if "text" in record or getattr(tokenizer, "chat_template", None) is None:
        text, _, special, _ = render(record, tokenizer, "all")
    else:                                         # one rendering: the spans do not matter here
        text, special = render_conversations(tokenizer, [conversation(record)])[0], False
    found = len(tokenizer(text[:cut], add_special_tokens=special)["input_ids"])
    return found - PREFIX_MARGIN if found - PREFIX_MARGIN > limit else 0


def characters(value) -> int:
    """The characters of every string in a record (its rendering holds at least as many)."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, dict):
        return sum(characters(v) for v in value.values())
    if isinstance(value, list):
        return sum(characters(v) for v in value)
    return 0


def encode_preference(pair: dict, tokenizer) -> list[tuple[list[int], list[int]]]:
    """[(input_ids, labels) of the chosen sequence, those of the rejected] of a normalized preference pair
    (records.normalize_preference); only the response is trained."""
    return [encode_record(record, tokenizer, first_trained_turn=first) for record, first in preference_records(pair)]


def encode_records(items: list[tuple[dict, int]], tokenizer, train_on: str = "assistant",
                   shapes: ConversationShapes | None = None) -> list[tuple[np.ndarray, np.ndarray, bool]]:
    """(input_ids, labels, slow path?), int64 arrays, of many (record, first trained turn) at once, equal to
    encode_record's: each conversation rendered once (chat_shapes: its spans from its shape, else encode.render,
    the slow path), all tokenized in one call per kind (the fast tokenizer's batch, threaded in Rust). ``shapes``:
    those learnt so far, kept between calls. A record the template refuses raises for the whole batch, without
    saying which."""
    if train_on not in TRAIN_ON:
        raise ValueError(f"train_on {train_on!r}: choose one of {', '.join(TRAIN_ON)}")
    shapes = shapes if shapes is not None else ConversationShapes(tokenizer)
    rendered: list = [None] * len(items)              # (text, spans, add special tokens?, append eos?, slow?)
    templated = []                                    # (item index, turns, Shape or None for train_on="all")
    for n, (record, first) in enumerate(items):
        if "text" in record or getattr(tokenizer, "chat_template", None) is None:
            rendered[n] = (*render(record, tokenizer, train_on, first), False)
            continue
        turns = conversation(record)
        shape = shapes.shape(turns, first) if train_on == "assistant" else None
        if train_on == "assistant" and shape is None:
            rendered[n] = (*render(record, tokenizer, train_on, first), True)
        else:
            templated.append((n, turns, shape))
    texts = render_conversations(tokenizer, [turns for _, turns, _ in templated])
    for (n, turns, shape), text in zip(templated, texts):
        spans = shape.spans_in(turns, text) if shape is not None else [(0, len(text))]
        rendered[n] = (text, spans, False, False, False) if spans is not None else \
            (*render(items[n][0], tokenizer, train_on, items[n][1]), True)
    out: list = [None] * len(items)
    eos = tokenizer.eos_token_id
    for special in (True, False):
        which = [n for n, r in enumerate(rendered) if r[2] == special]
        for n, (ids, offsets) in zip(which, _encodings(tokenizer, [rendered[n][0] for n in which], special)
                                     if which else []):
            _, spans, _, add_eos, slow = rendered[n]
            labels = np.where(_trained(offsets, spans), ids, IGNORE_INDEX)
            if add_eos and eos is not None:
                ids, labels = np.append(ids, eos), np.append(labels, eos)
            out[n] = (ids, labels, slow)
    return out


def tokenize_records(records: list[dict], tokenizer, train_on: str = "assistant") -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) of each record (see encode_record), encoded together (encode_records)."""
    return [(ids.tolist(), labels.tolist())
            for ids, labels, _ in encode_records([(r, 0) for r in records], tokenizer, train_on)]


def load_tokenizer(model_dir: str | Path):
    """transformers.AutoTokenizer from local files only; a clear error if the directory has none."""
    import transformers
    model_dir = Path(model_dir)
    names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
    if not any((model_dir / name).is_file() for name in names):
        raise FileNotFoundError(f"{model_dir} has no tokenizer (none of {', '.join(names)}); save one there with "
                                "tokenizer.save_pretrained(dir)")
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds; the directory is what matters
        raise ValueError(f"could not load the tokenizer in {model_dir}: {e}") from e
    return tokenizer
