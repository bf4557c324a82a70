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

Preference pairs (DPO, ``parse_line(..., preference=True)``), the first that matches wins:
    {"prompt": str | [turns], "chosen": ..., "rejected": ...}      TRL, explicit prompt; chosen and rejected a
                                                                    string or a list of assistant turns
    {"messages": [turns], "chosen": ..., "rejected": ...}          the prompt as a conversation
    {"chosen": [turns], "rejected": [turns]}                       TRL, implicit prompt: the turns both share
    {"instruction", "input"?, "system"?, "chosen": str, "rejected": str}            LLaMA-Factory, Alpaca
    {"conversations": [...], "system"?, "chosen": {"from", "value"}, "rejected": ...}   LLaMA-Factory, ShareGPT
become {"prompt": str, "chosen": str, "rejected": str} (strings all three) or {"prompt": [turns], "chosen":
[assistant turns], "rejected": [assistant turns]}.
"""
from __future__ import annotations

import json
from pathlib import Path

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def parse_line(raw: bytes, where: str, first: bool = False, preference: bool = False) -> dict | None:
    """The record on one raw line, or None for a blank line. ``first``: a byte-order mark may open it;
    ``preference``: a preference pair (normalize_preference) instead of a training record."""
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
    return normalize_preference(record, where) if preference else normalize(record, where)


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


def normalize_preference(record: dict, where: str) -> dict:
    """{"prompt", "chosen", "rejected"}: three strings, or the prompt's turns and each response's assistant turns."""
    for key in ("chosen", "rejected"):
        if key not in record:
            other = "rejected" if key == "chosen" else "chosen"
            raise ValueError(f'{where}: "{key}" is missing; a preference pair needs "chosen" and "rejected" (and '
                             f'the prompt: "prompt", "messages", or the turns "{other}" shares with it)')
    if "prompt" in record and isinstance(record["prompt"], str):
        prompt = record["prompt"]
    elif "prompt" in record or "messages" in record:
        key = "prompt" if "prompt" in record else "messages"
        prompt = _messages(record[key], where, key, "role", "content", {r: r for r in ROLES}, need_assistant=False)
    elif "instruction" in record:
        user = _string(record, "instruction", where)
        if record.get("input"):
            user += "\n" + _string(record, "input", where)
        prompt = _with_system(record, [{"role": "user", "content": user}], where)
    elif "conversations" in record:
        prompt = _with_system(record, _messages(record["conversations"], where, "conversations", "from", "value",
                                                SHAREGPT_ROLES, need_assistant=False), where)
    else:                                             # TRL's implicit prompt: the turns chosen and rejected share
        chosen, rejected = (_messages(record[k], where, k, "role", "content", {r: r for r in ROLES})
                            for k in ("chosen", "rejected"))
        shared = 0
        while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
            shared += 1
        if shared == 0:
            raise ValueError(f'{where}: no prompt: give "prompt" (or "messages"), or chosen and rejected '
                             "conversations that start with the same turns")
        return {"prompt": chosen[:shared], **{k: _responses(turns[shared:], where, k)
                                             for k, turns in (("chosen", chosen), ("rejected", rejected))}}
    responses = {k: _response(record[k], where, k) for k in ("chosen", "rejected")}
    if isinstance(prompt, str) and all(isinstance(r, str) for r in responses.values()):
        return {"prompt": prompt, **responses}
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    return {"prompt": prompt, **{k: [{"role": "assistant", "content": r}] if isinstance(r, str) else r
                                 for k, r in responses.items()}}


def _response(value, where: str, key: str):
    """A response: a string, one ShareGPT turn {"from": "gpt", "value"} (LLaMA-Factory), or assistant turns."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        turns = _messages([value], where, key, "from" if "from" in value else "role",
                          "value" if "value" in value else "content", {**SHAREGPT_ROLES, **{r: r for r in ROLES}},
                          need_assistant=False)
        return _responses(turns, where, key)
    return _responses(_messages(value, where, key, "role", "content", {r: r for r in ROLES}, need_assistant=False),
                      where, key)


def _responses(turns: list[dict], where: str, key: str) -> list[dict]:
    if not turns or any(t["role"] != "assistant" for t in turns):
        raise ValueError(f'{where}: "{key}" must be a string or a list of assistant turns (roles: '
                         f"{[t['role'] for t in turns] or 'none'})")
    return turns


def _with_system(record: dict, messages: list[dict], where: str) -> list[dict]:
    if record.get("system") and messages[0]["role"] != "system":
        return [{"role": "system", "content": _string(record, "system", where)}] + messages
    return messages


def _messages(turns, where: str, key: str, role_key: str, content_key: str, roles: dict,
              need_assistant: bool = True) -> list[dict]:
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
    if need_assistant and not any(m["role"] == "assistant" for m in messages):
        raise ValueError(f"{where}: the conversation has no assistant turn, so nothing in it would be trained")
    return messages


def iter_lines(path: str | Path):
    """(line number, raw bytes) of every line of a file, streamed."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} not found")
    with path.open("rb") as f:
        yield from enumerate(f, start=1)


def read_jsonl(path: str | Path, preference: bool = False) -> list[dict]:
    """Every record (``preference``: pair) of a (small) JSONL file, checked and normalized; blank lines skipped.
    Large files go through packing.prepare, which streams."""
    records = []
    for number, raw in iter_lines(path):
        record = parse_line(raw, f"{path}:{number}", first=number == 1, preference=preference)
        if record is not None:
            records.append(record)
    if not records:
        raise ValueError(f"data file {path} holds no records (it is empty or all its lines are blank)")
    return records
