"""Word-level tokenizers built offline, with the two common chat template styles written out: ChatML as Qwen
renders it (a default system turn when there is none, <|im_end|> and a newline after every turn) and the
Llama 3 style (BOS, header tokens, contents trimmed, <|eot_id|>)."""
from __future__ import annotations

import transformers

WORDS = ("the a cat dog sat ran on under mat rug big small red blue what did do ? . yes no you are helpful "
         "assistant system user is color sky green grass how many legs has four two hello hi name my bot , "
         "tell me about").split()

CHATML = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nyou are a helpful assistant .<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

LLAMA3 = (
    "{{ bos_token }}{% for message in messages %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n{{ message['content'] | trim }}<|eot_id|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)

STYLES = {
    None: dict(specials=["<pad>", "<unk>", "<s>", "</s>"], pad="<pad>", bos="<s>", eos="</s>", template=None),
    "chatml": dict(specials=["<|endoftext|>", "<unk>", "<|im_start|>", "<|im_end|>"], pad="<|endoftext|>", bos=None,
                   eos="<|im_end|>", template=CHATML),
    "llama3": dict(specials=["<|finetune_pad|>", "<unk>", "<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>",
                             "<|end_header_id|>"], pad="<|finetune_pad|>", bos="<|begin_of_text|>", eos="<|eot_id|>",
                   template=LLAMA3),
}


def make_tokenizer(path=None, style: str | None = None, words=WORDS):
    """A word-level tokenizer (whitespace and punctuation split) with the special tokens and chat template of
    ``style``; saved next to a model like a real checkpoint's when ``path`` is given."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    spec = STYLES[style]
    vocab = {tok: i for i, tok in enumerate(spec["specials"] + list(words))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=core, pad_token=spec["pad"], unk_token="<unk>",
                                                     bos_token=spec["bos"], eos_token=spec["eos"])
    named = (spec["pad"], spec["bos"], spec["eos"], "<unk>")
    tokenizer.add_special_tokens({"additional_special_tokens": [t for t in spec["specials"] if t not in named]})
    if spec["template"] is not None:
        tokenizer.chat_template = spec["template"]
    if path is not None:
        tokenizer.save_pretrained(str(path))
    return tokenizer
