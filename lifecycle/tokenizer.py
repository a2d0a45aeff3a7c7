"""Train the byte-level BPE tokenizer that `llm pretrain` ships with the model.

Digits are split one per token before BPE (as Llama's tokenizer does): merged
multi-digit tokens make arithmetic much harder for a small model. A space before
a number stays attached to its first digit (" 135" -> "Ġ1" "3" "5"), so a number
costs no extra token. The chat template puts a space between each role marker and
the content, so an answer after "<|assistant|>" is tokenized exactly like a number
in running text. The special tokens and the chat template are fixed here so every
stage agrees on them.
"""

from __future__ import annotations

from typing import Iterable

EOS = "<|endoftext|>"
PAD = "<|pad|>"
SPECIAL_TOKENS = [EOS, PAD, "<|system|>", "<|user|>", "<|assistant|>"]

# Chat template: role markers are single special tokens; the assistant turn
# ends with EOS. `{% generation %}` marks assistant tokens so trainers can put
# the loss on them only.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}<|system|> {{ message['content'] }}"
    "{% elif message['role'] == 'user' %}<|user|> {{ message['content'] }}"
    "{% elif message['role'] == 'assistant' %}<|assistant|>{% generation %} {{ message['content'] }}<|endoftext|>{% endgeneration %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def train_tokenizer(texts: Iterable[str], vocab_size: int):
    """Train a byte-level BPE on `texts`; returns a transformers PreTrainedTokenizerFast."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r" ?[0-9]"), behavior="isolated"), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS,
        pad_token=PAD,
        bos_token=None,
        unk_token=None,
        additional_special_tokens=SPECIAL_TOKENS[2:],
        model_max_length=1_000_000,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def load_tokenizer(path: str, trust_remote_code: bool = False):
    """Load a tokenizer (directory or hub id); make sure it has EOS and PAD."""
    from transformers import AutoTokenizer

    from lifecycle.errors import UsageError

    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot load a tokenizer from {path} ({str(e).splitlines()[0][:200]}); pass a directory with tokenizer.json or a hub id") from None
    if tok.eos_token is None:
        raise UsageError(f"tokenizer at {path} has no EOS token; add one (eos_token) or train a new tokenizer by leaving --tokenizer out")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


# transformers 5 writes two things into tokenizer_config.json that 4.x cannot read:
# "tokenizer_class": "TokenizersBackend" (4.x has no such class: "Tokenizer class
# TokenizersBackend does not exist or is not currently imported") and
# "extra_special_tokens" as a list (4.x expects a mapping of names to tokens and
# fails with "'list' object has no attribute 'keys'"). 4.x's names for the same
# things are "PreTrainedTokenizerFast" and "additional_special_tokens", which 5.x
# still reads (it maps the first to TokenizersBackend and converts the second).
# 4.x releases before the separate chat_template.jinja file read the template
# from tokenizer_config.json only, so it is kept there as well.
V4_CLASS = {"TokenizersBackend": "PreTrainedTokenizerFast"}


def portable_tokenizer_config(config: dict, chat_template: str | None = None) -> dict:
    """A tokenizer_config.json mapping that transformers 4.x and 5.x both load the same way."""
    config = dict(config)
    config["tokenizer_class"] = V4_CLASS.get(config.get("tokenizer_class"), config.get("tokenizer_class"))
    extra = config.get("extra_special_tokens")
    if isinstance(extra, list):
        del config["extra_special_tokens"]
        config["additional_special_tokens"] = extra
    if chat_template and "chat_template" not in config:
        config["chat_template"] = chat_template
    return {k: config[k] for k in sorted(config) if config[k] is not None or k.endswith("_token")}


def save_tokenizer(tokenizer, directory) -> None:
    """`tokenizer.save_pretrained(directory)`, with a tokenizer_config.json both transformers 4.x and 5.x read."""
    import json
    from pathlib import Path

    tokenizer.save_pretrained(directory)
    path = Path(directory) / "tokenizer_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    template = tokenizer.chat_template if isinstance(getattr(tokenizer, "chat_template", None), str) else None
    path.write_text(json.dumps(portable_tokenizer_config(config, template), indent=2, ensure_ascii=False) + "\n",
                    encoding="utf-8")
