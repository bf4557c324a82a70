"""JSONL records: one JSON object a line, checked and brought to one of three shapes.

Formats a line may have (the first that matches its keys wins; other keys are ignored):
    {"text": ...}                                    plain text, every token trained
    {"prompt": ..., "response": ...}                 one exchange, the response trained
    {"messages": [{"role", "content"}, ...]}         a conversation (OpenAI / TRL); roles system, user, assistant
    {"instruction", "input"?, "output", "system"?}   Alpaca as LLaMA-Factory reads it: the user turn is the
                                                     instruction, then a newline and the input when there is one
    {"conversations": [{"from", "value"}, ...], "system"?}   ShareGPT: from human/user, gpt/assistant, system

Alpaca and ShareGPT lines become {"messages": [...]}, so a record is {"text"}, {"prompt", "response"} or
{"messages"}. Errors name the file and the 1-based line number.
"""
from __future__ import annotations

import json
from pathlib import Path

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def parse_line(raw: bytes, where: str, first: bool = False) -> dict | None:
    """The record on one raw line, or None for a blank line. ``first``: a byte-order mark may open it."""
    try:
        line = raw.decode("utf-8-sig" if first else "utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{where}: not UTF-8 (byte {raw[e.start]:#04x} at column {e.start + 1})") from None
    if not line.strip():
        return None
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    return normalize(record, where)


def _string(record: dict, key: str, where: str, hint: str = "") -> str:
    if key not in record:
        raise ValueError(f'{where}: "{key}" is missing{hint}')
    if not isinstance(record[key], str):
        raise ValueError(f'{where}: "{key}" must be a string, got {type(record[key]).__name__}')
    return record[key]


def normalize(record: dict, where: str) -> dict:
    """{"text"}, {"prompt", "response"} or {"messages"} from a record of any format above."""
    if "text" in record:
        return {"text": _string(record, "text", where)}
    if "prompt" in record or "response" in record:
        hint = ' (a line with "prompt" needs "response" too)'
        return {"prompt": _string(record, "prompt", where, hint), "response": _string(record, "response", where, hint)}
    if "messages" in record:
        return {"messages": _messages(record["messages"], where, "messages", "role", "content", {r: r for r in ROLES})}
    if "instruction" in record or "output" in record:
        hint = ' (an Alpaca line has "instruction", "output" and an optional "input")'
        user = _string(record, "instruction", where, hint)
        if record.get("input"):
            user += "\n" + _string(record, "input", where, hint)
        messages = [{"role": "user", "content": user},
                    {"role": "assistant", "content": _string(record, "output", where, hint)}]
        return {"messages": _with_system(record, messages, where)}
    if "conversations" in record:
        messages = _messages(record["conversations"], where, "conversations", "from", "value", SHAREGPT_ROLES)
        return {"messages": _with_system(record, messages, where)}
    raise ValueError(f'{where}: expected a "text" key, or "prompt" and "response", "messages", Alpaca\'s '
                     f'"instruction" and "output", or ShareGPT\'s "conversations"; got '
                     f"{sorted(record) or 'an empty object'}")


def _with_system(record: dict, messages: list[dict], where: str) -> list[dict]:
    if record.get("system") and messages[0]["role"] != "system":
        return [{"role": "system", "content": _string(record, "system", where)}] + messages
    return messages


def _messages(turns, where: str, key: str, role_key: str, content_key: str, roles: dict) -> list[dict]:
    if not isinstance(turns, list) or not turns:
        raise ValueError(f'{where}: "{key}" must be a non-empty list of turns')
    messages = []
    for n, turn in enumerate(turns):
        at = f'{where}: {key}[{n}]'
        if not isinstance(turn, dict):
            raise ValueError(f"{at} must be an object with {role_key!r} and {content_key!r}")
        role = turn.get(role_key)
        if role not in roles:
            raise ValueError(f"{at}: {role_key} {role!r} is not one of {', '.join(roles)}")
        content = turn.get(content_key)
        if not isinstance(content, str):
            raise ValueError(f"{at}: {content_key!r} must be a string, got {type(content).__name__}")
        messages.append({"role": roles[role], "content": content})
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError(f"{where}: the conversation has no assistant turn, so nothing in it would be trained")
    return messages


def iter_lines(path: str | Path):
    """(line number, raw bytes) of every line of a file, streamed."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} not found")
    with path.open("rb") as f:
        yield from enumerate(f, start=1)


def read_jsonl(path: str | Path) -> list[dict]:
    """Every record of a (small) JSONL file, checked and normalized; blank lines skipped. Large files go through
    packing.prepare, which streams."""
    records = []
    for number, raw in iter_lines(path):
        record = parse_line(raw, f"{path}:{number}", first=number == 1)
        if record is not None:
            records.append(record)
    if not records:
        raise ValueError(f"data file {path} holds no records (it is empty or all its lines are blank)")
    return records
