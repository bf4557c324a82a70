"""Data: what a loader yields made into a MicroBatch, the demo's addition task, and fine-tuning data from JSONL files.
Imports models (MicroBatch) and the kernels (IGNORE_INDEX) only.

    batch      a loader's batch -> one MicroBatch on the compute device (Engine.prepare asks it once a batch)
    pairs      DPO's pairs in a micro-batch (which sequence each target is in, the reference sums)
    addition   the built-in task of the demo (character tokenizer, held-out problems, greedy exact match)
    records    JSONL lines checked and normalized: text, prompt/response, messages, Alpaca, ShareGPT
    encode     a record -> token ids and labels, with the tokenizer's chat template; which tokens are trained;
               many records at once (encode_records)
    chat_shapes  what a chat template makes of every conversation of one shape: spans from one rendering a record
    packing    documents packed into rows, streamed from files of any size by worker processes; the loaders

Fine-tuning from Python:

    from horizon_triton import data
    tokenizer = data.load_tokenizer("hf_dir")
    prepared = data.prepare("chat.jsonl", tokenizer, seq_len=1024, pad_id=tokenizer.pad_token_id, out_dir="tmp")
    loader = data.RowLoader(prepared.train, batch_size=8, epochs=3)
"""
from horizon_triton.kernels.reference import IGNORE_INDEX

from .addition import AdditionTask, CharTokenizer, Problem, exact_match, greedy_answers, pad_rows
from .encode import (PROMPT_RESPONSE_SEPARATOR, TRAIN_ON, encode_preference, encode_record, encode_records,
                     load_tokenizer, render, tokenize_records)
from .packing import (TEMPORARY, TOO_LONG, DataStats, PackedRows, Packer, Prepared, RowLoader, encoded_documents,
                      in_eval_split, pack_documents, pack_pairs, prepare, steps_per_epoch)
from .records import normalize, normalize_preference, parse_line, read_jsonl

__all__ = ["IGNORE_INDEX", "AdditionTask", "CharTokenizer", "Problem", "exact_match", "greedy_answers", "pad_rows",
           "PROMPT_RESPONSE_SEPARATOR", "TRAIN_ON", "encode_preference", "encode_record", "encode_records",
           "load_tokenizer", "render",
           "tokenize_records", "TEMPORARY", "TOO_LONG", "DataStats", "PackedRows", "Packer", "Prepared", "RowLoader",
           "encoded_documents", "in_eval_split", "pack_documents", "pack_pairs", "prepare", "steps_per_epoch",
           "normalize", "normalize_preference", "parse_line", "read_jsonl"]
