"""``horizon-triton data``: how a data file tokenizes with a model's tokenizer, the trained tokens marked, and the
statistics of the whole file."""
from __future__ import annotations

from .. import data
from .train import prepare_rows, seq_len_for


def run_data(args) -> dict:
    """Shows how --data tokenizes with --model's tokenizer: the first --show records token by token, trained
    tokens marked, and the statistics of the whole file."""
    from .. import ModelConfig
    model_cfg = ModelConfig.from_pretrained(args.model)
    tokenizer = data.load_tokenizer(args.model)
    seq_len = seq_len_for(args, model_cfg)
    prepared = prepare_rows(args, tokenizer, seq_len, args.data, None, keep_examples=args.show)
    if prepared.examples:
        print("trained tokens are shown \u00abbetween guillemets\u00bb")
    for number, ids, labels in prepared.examples:
        pair = isinstance(ids, list)                 # a preference pair: its chosen and its rejected
        for what, seq_ids, seq_labels in zip(("chosen", "rejected"), ids, labels) if pair else [("", ids, labels)]:
            trained = int((seq_labels != data.IGNORE_INDEX).sum())
            print(f"--- {args.data}:{number}{' ' + what if what else ''}: {len(seq_ids)} tokens, {trained} trained")
            print(show_tokens(tokenizer, seq_ids, seq_labels))
    stats = prepared.stats["train"]
    print(f"{args.data}: {stats.summary(seq_len, args.too_long or 'drop')}")
    return {"stats": stats, "examples": prepared.examples}


def show_tokens(tokenizer, ids, labels) -> str:
    """The decoded tokens with each run of trained ones between \u00ab and \u00bb."""
    pieces, run, trained_run = [], [], None
    for token, label in zip(ids.tolist(), labels.tolist()):
        trained = label != data.IGNORE_INDEX
        if trained != trained_run and run:
            pieces.append((trained_run, run))
            run = []
        run.append(token)
        trained_run = trained
    if run:
        pieces.append((trained_run, run))
    text = ""
    for trained, run in pieces:
        piece = tokenizer.decode(run, skip_special_tokens=False)
        text += f"\u00ab{piece}\u00bb" if trained else piece
    return text
