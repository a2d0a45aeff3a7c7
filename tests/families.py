"""Tiny random-weight models of today's decoder-only families, and a ChatML tokenizer, built offline.

A user points `llm` at a hub directory: a config.json of some model_type, weights,
a tokenizer whose chat template ends each turn with its own marker (here ChatML's
`<|im_end|>`, as Qwen's), and a generation_config.json that lists several stop
ids and sets its own sampling options. These builders make such directories from
the transformers config classes, a few thousand parameters each, with no download.
"""

from __future__ import annotations

from pathlib import Path

IM_START, IM_END, EOT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"

# ChatML as hub tokenizers ship it: no `{% generation %}` markers, and the turn
# ends with <|im_end|> followed by a newline, not with EOS.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256)

# model_type -> (config class name, extra kwargs). Each turns on the feature that
# sets its family apart: QK-norm (qwen3), logit soft-capping, sliding windows and
# sandwich norms (gemma2), fused qkv / gate_up (phi3), routed experts (mixtral, qwen3_moe).
FAMILIES: dict[str, tuple[str, dict]] = {
    "llama": ("LlamaConfig", dict(tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", dict(head_dim=8, tie_word_embeddings=True)),
    "gemma2": ("Gemma2Config", dict(head_dim=8, sliding_window=16, final_logit_softcapping=30.0,
                                    attn_logit_softcapping=50.0, query_pre_attn_scalar=8)),
    "phi3": ("Phi3Config", dict(tie_word_embeddings=False)),
    "mixtral": ("MixtralConfig", dict(num_local_experts=4, num_experts_per_tok=2, tie_word_embeddings=False)),
    "qwen3_moe": ("Qwen3MoeConfig", dict(head_dim=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                                         decoder_sparse_step=1, mlp_only_layers=[], tie_word_embeddings=False)),
}


def chatml_tokenizer(texts: list[str] | None = None, vocab_size: int = 320):
    """A byte-level BPE with ChatML special tokens: EOS is <|endoftext|>, a turn ends with <|im_end|>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if texts is None:
        from lifecycle.data import world

        texts = world.pretrain_documents(300, seed=1)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT, IM_START, IM_END],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOT, pad_token=EOT, bos_token=None, unk_token=None,
                                   additional_special_tokens=[IM_START, IM_END], model_max_length=1_000_000)
    fast.chat_template = CHATML_TEMPLATE
    return fast


def family_config(family: str, tokenizer):
    import transformers

    cls_name, extra = FAMILIES[family]
    kw = dict(_SMALL, vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id,
              pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    kw.update(extra)
    return getattr(transformers, cls_name)(**kw)


def make_family_dir(out: Path, family: str, tokenizer, seed: int = 0) -> Path:
    """A hub-style model directory (no lifecycle.json): weights, tokenizer, and a generation_config
    with several stop ids and hub sampling defaults that must not leak into our samplers."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(family_config(family, tokenizer))
    im_end = tokenizer.convert_tokens_to_ids(IM_END)
    model.generation_config = GenerationConfig(
        eos_token_id=[im_end, tokenizer.eos_token_id], pad_token_id=tokenizer.pad_token_id, do_sample=True,
        temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.3,
    )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out
