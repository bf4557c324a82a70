"""Assistant spans from one rendering a record: what a chat template makes of every conversation of one shape (its
roles, in order), learnt once from renderings with placeholder contents, then applied to each record of that shape.

encode.render finds a conversation's trained spans by rendering its prefixes: two more renderings an assistant turn.
A template that writes each content as it is, or trimmed, and whose other text depends on the roles only, renders
every conversation of one shape as the same literal pieces around the contents. So the pieces, how each content is
written and where the spans start and end are found once a shape, by encode.render's own prefix rule applied to
renderings whose contents are placeholders (private-use characters: "\\ue000" index "\\ue001"); a record then gets
its contents put between the pieces (``Shape.spans``) and one rendering of its own, which must equal that text:
the proof that the template wrote this record's contents as it wrote the placeholders.

The slow path (encode.render) stays for what this cannot prove: shapes whose prefix renderings are not prefixes of
the whole (Qwen3's think block on the last turn, Mistral's system prompt in the last user turn), a content written
twice, altered otherwise than trimmed or not at all, a span that ends right after a content (a trailing space
would move its end), and records whose own rendering differs from the pieces filled in (a template that looks at
what a content says). Each such record is counted (``DataStats.slow_path``).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

OPEN, CLOSE = "\ue000", "\ue001"
PADDING = " \n"                      # around a placeholder: shows whether the template trims the content
PLACEHOLDER = re.compile("\ue000(\\d+)\ue001")
MAX_SHAPES = 4096                    # distinct role sequences remembered; more are learnt again when met


def render_conversations(tokenizer, conversations: list[list[dict]], add_generation_prompt: bool = False) -> list[str]:
    """The template's text of each conversation, all in one apply_chat_template call."""
    if not conversations:
        return []
    try:
        return tokenizer.apply_chat_template(conversations, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as e:  # noqa: BLE001 - templates raise their own errors (e.g. roles that must alternate)
        raise ValueError(f"the chat template refused the conversation: {e}") from None


@dataclass(frozen=True)
class Shape:
    """A conversation of one shape renders as literals[0] + content + literals[1] + ... + literals[-1]; slots[j] is
    (the message whose content comes after literals[j], whether it is trimmed); spans[s] is ((j, offset), (j,
    offset)): where span s starts and ends, as an offset into literals[j]."""
    literals: tuple[str, ...]
    slots: tuple[tuple[int, bool], ...]
    spans: tuple[tuple[tuple[int, int], tuple[int, int]], ...]

    def spans_in(self, messages: list[dict], rendered: str) -> list[tuple[int, int]] | None:
        """The trained character spans of ``rendered`` (the template's text of ``messages``), or None when that
        text is not the literals with these contents put in."""
        starts, pieces, at = [], [], 0
        for j, literal in enumerate(self.literals):
            starts.append(at)
            pieces.append(literal)
            at += len(literal)
            if j < len(self.slots):
                index, trimmed = self.slots[j]
                content = messages[index]["content"]
                content = content.strip() if trimmed else content      # Jinja's trim is str.strip()
                pieces.append(content)
                at += len(content)
        if at != len(rendered) or "".join(pieces) != rendered:
            return None
        return [(starts[a] + i, starts[b] + k) for (a, i), (b, k) in self.spans]


def _placeholders(roles: tuple[str, ...], padding: str = "") -> list[dict]:
    return [{"role": role, "content": f"{padding}{OPEN}{n}{CLOSE}{padding}"} for n, role in enumerate(roles)]


def learn_shape(tokenizer, roles: tuple[str, ...], first_trained_turn: int) -> Shape | None:
    """The Shape of conversations with these roles, or None where the template does not allow one (see above)."""
    plain = _placeholders(roles)
    trained = [k for k, role in enumerate(roles) if role == "assistant" and k >= first_trained_turn]
    text, padded, *throughs = render_conversations(
        tokenizer, [plain, _placeholders(roles, PADDING)] + [plain[:k + 1] for k in trained if k < len(roles) - 1])
    befores = render_conversations(tokenizer, [plain[:k] for k in trained if k], add_generation_prompt=True)
    literals = PLACEHOLDER.split(text)[0::2]
    order = [int(n) for n in PLACEHOLDER.findall(text)]
    if sorted(order) != list(range(len(roles))) or any(OPEN in lit or CLOSE in lit for lit in literals):
        return None                                   # a content left out, written twice, or cut
    slots = []
    for n in order:                                   # trimmed, or written as it is? The padded rendering says
        slots.append((n, f"{PADDING}{OPEN}{n}{CLOSE}{PADDING}" not in padded))
    expected = literals[0] + "".join(
        (f"{OPEN}{n}{CLOSE}" if trimmed else f"{PADDING}{OPEN}{n}{CLOSE}{PADDING}") + literal
        for (n, trimmed), literal in zip(slots, literals[1:]))
    if expected != padded:
        return None                                   # padding changed more than trimming would
    starts, at = [], 0                                # where each literal starts in ``text``
    for j, literal in enumerate(literals):
        starts.append(at)
        at += len(literal) + (len(f"{OPEN}{order[j]}{CLOSE}") if j < len(order) else 0)

    def where(position: int) -> tuple[int, int] | None:
        """(literal, offset) of a position of ``text``; None inside a placeholder."""
        for j in range(len(literals) - 1, -1, -1):
            if starts[j] <= position:
                return (j, position - starts[j]) if position - starts[j] <= len(literals[j]) else None
        return None

    spans = []
    throughs, befores = iter(throughs), iter(befores)
    for k in trained:
        before = next(befores) if k else ""
        through = (text if k == len(roles) - 1 else next(throughs)).rstrip()
        if not (through.startswith(before) and text.startswith(through)) or through.endswith(CLOSE):
            return None                               # encode.render blanks the content to find such a turn
        start, end = where(len(before)), where(len(through))
        if start is None or end is None:
            return None
        spans.append((start, end))
    return Shape(tuple(literals), tuple(slots), tuple(spans))


class ConversationShapes:
    """Shapes learnt so far for one tokenizer's template, by (roles, first trained turn); None: the slow path."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._known: dict[tuple, Shape | None] = {}

    def shape(self, messages: list[dict], first_trained_turn: int = 0) -> Shape | None:
        key = (tuple(m["role"] for m in messages), first_trained_turn)
        if key not in self._known:
            if len(self._known) >= MAX_SHAPES:
                self._known.clear()
            self._known[key] = learn_shape(self.tokenizer, key[0], first_trained_turn)
        return self._known[key]
