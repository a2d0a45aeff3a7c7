"""Every stage on every family: tiny random llama, qwen3, gemma2, phi3, mixtral and qwen3_moe models as a user
would hand them over (hub-style directories with a ChatML tokenizer), and the chat-template rules hub models need.

PPO on every family is in tests/test_ppo_families.py; the memory estimator's families in tests/test_memory_families.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from families import FAMILIES, IM_END, family_config

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
ALL = list(FAMILIES)


def _changed(before_dir: Path, after_dir: Path) -> bool:
    import torch
    from safetensors.torch import load_file

    before, after = load_file(Path(before_dir) / "model.safetensors"), load_file(Path(after_dir) / "model.safetensors")
    shared = [k for k in before if k in after and before[k].shape == after[k].shape]
    assert shared, "no common tensors between base and fine-tuned model"
    return any(not torch.equal(before[k].float(), after[k].float()) for k in shared)


def _sft(base: Path, out: Path, **kw):
    from lifecycle.config import SFTConfig, build_config
    from lifecycle.stages import sft

    values = dict(base=str(base), out=str(out), max_steps=2, world_examples=16, eval_problems=4, batch_size=4,
                  eval_batch_size=8, warmup_steps=0, save_every=0, log_every=1, eval_every=100, lr=1e-2)
    values.update(kw)
    return sft.run(build_config(SFTConfig, None, values))


# ---------------------------------------------------------------------------
# sft: full and LoRA on every family; QLoRA and DoRA on a dense and an MoE one
# ---------------------------------------------------------------------------
MATRIX = [(f, "full") for f in ALL] + [(f, "lora") for f in ALL] + [
    ("qwen3", "qlora"), ("qwen3_moe", "qlora"), ("gemma2", "dora"), ("phi3", "dora")]


@pytest.mark.parametrize("family,mode", MATRIX, ids=[f"{f}-{m}" for f, m in MATRIX])
def test_sft_runs_on_every_family(family, mode, family_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    base = family_dir(family)
    flags = {} if mode == "full" else {mode: True}
    out = _sft(base, tmp_path / "sft", **flags)
    m = json.loads((out / "lifecycle.json").read_text())
    assert m["stage"] == "sft" and m["mode"] == mode
    assert m["metrics"]["steps"] == 2 and m["metrics"]["eval_loss"] > 0
    model = AutoModelForCausalLM.from_pretrained(out)  # stock transformers reads the artifact
    assert model.config.model_type == family
    assert _changed(base, out), "no weight changed"
    if mode != "full":
        from peft import PeftConfig

        assert PeftConfig.from_pretrained(out / "adapter").peft_type.value == "LORA"


def test_lora_on_a_mixture_of_experts_adapts_the_experts(family_dir, capsys):
    from types import SimpleNamespace

    from lifecycle.modeling import load_for_training

    peft = SimpleNamespace(lora=True, qlora=False, dora=False, lora_r=4, lora_alpha=8, lora_dropout=0.05,
                           lora_target_modules="all-linear")
    model = load_for_training(str(family_dir("mixtral")), peft)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any(".mlp.experts." in n and "lora_A" in n for n in names), "experts not adapted"
    assert any("self_attn.q_proj.lora_A" in n for n in names)
    assert all("lora_" in n for n in names)  # the experts' own weights stay frozen
    assert "lora_dropout 0.05 -> 0" in capsys.readouterr().out


# ---------------------------------------------------------------------------
# The completion-only loss on a hub template: exactly the assistant turn and its end marker
# ---------------------------------------------------------------------------
def test_assistant_mask_covers_each_turn_through_its_end_marker(chatml_tokenizer):
    from lifecycle.data.chat import assistant_mask, end_of_turn_ids

    tok = chatml_tokenizer
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "what is 1 plus 2 ?"},
            {"role": "assistant", "content": "3"}, {"role": "user", "content": "and 2 plus 2 ?"},
            {"role": "assistant", "content": "4"}]
    ids, mask, skipped = assistant_mask(tok, msgs)
    assert skipped == 0 and len(ids) == len(mask)
    # The rendered text, by hand: "...<|im_start|>assistant\n3<|im_end|>\n<|im_start|>user\n...4<|im_end|>\n"
    assert tok.decode([i for i, b in zip(ids, mask) if b]) == f"3{IM_END}4{IM_END}"
    # Two spans, each ending on the marker; the newline after it is not trained.
    im_end = tok.convert_tokens_to_ids(IM_END)
    ends = [j for j in range(len(ids)) if mask[j] and (j + 1 == len(ids) or not mask[j + 1])]
    assert [ids[j] for j in ends] == [im_end, im_end] and all(ids[j + 1] != im_end for j in ends)
    assert end_of_turn_ids(tok)[0] == im_end and tok.eos_token_id in end_of_turn_ids(tok)


def test_sft_trains_on_the_assistant_turn_and_marker_only(chatml_tokenizer, family_dir, tmp_path):
    """The labels TRL trains on (built from our masks) decode to the completion plus <|im_end|>, nothing else."""
    from lifecycle.config import SFTConfig, build_config
    from lifecycle.modeling import load_for_training
    from lifecycle.stages import sft

    rows = [{"prompt": [{"role": "user", "content": "what is 48 plus 87 ?"}],
             "completion": [{"role": "assistant", "content": "135"}]}] * 4
    cfg = build_config(SFTConfig, None, dict(base=str(family_dir("qwen3")), out=str(tmp_path / "o"), max_steps=1,
                                             batch_size=2, save_every=0, max_length=64))
    model = load_for_training(cfg.base, cfg)
    trainer = sft.build_trainer(cfg, model, chatml_tokenizer, rows, rows[:2], resuming=False)
    row = trainer.train_dataset[0]
    trained = [t for t, lab in zip(row["input_ids"], row["labels"]) if lab != -100]
    assert chatml_tokenizer.decode(trained) == f"135{IM_END}"


# ---------------------------------------------------------------------------
# reward: trained and read at the same position, whatever the padding
# ---------------------------------------------------------------------------
def test_reward_encoding_of_a_generated_turn_equals_the_chat_rendering(chatml_tokenizer):
    """PPO hands the reward model the rendered prompt plus the generated text (marker included); `llm reward`
    trains on the chat rendering. Both must be the same ids, ending on the end-of-turn marker."""
    from lifecycle.generate import render_prompts
    from lifecycle.reward_model import encode

    tok = chatml_tokenizer
    prompt = [{"role": "user", "content": "what is 1 plus 2 ?"}]
    chat, _ = encode(tok, [prompt], ["3"])
    text, _ = encode(tok, render_prompts(tok, [prompt]), [f"3{IM_END}"])
    assert chat == text
    assert chat[0][-1] == tok.convert_tokens_to_ids(IM_END)


@pytest.mark.parametrize("family", ["qwen3", "gemma2", "mixtral"])
def test_reward_runs_on_families_and_scores_where_it_trained(family, family_dir, tmp_path):
    """Plain-text pairs (ending with EOS, which this tokenizer also pads with) on each family; the held-out
    accuracy in the manifest is computed by `score`, the function PPO reads rewards with."""
    from transformers import AutoModelForSequenceClassification

    from lifecycle.config import RewardConfig, build_config
    from lifecycle.stages import reward

    data = tmp_path / "pairs.jsonl"
    # The preferred answer is marked by its last word, which every family learns in a few steps.
    rows = [{"chosen": f"{a} plus {b} equals {a + b} yes", "rejected": f"{a} plus {b} equals {a + b} no"}
            for a in range(10, 40) for b in (11, 23)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = build_config(RewardConfig, None, dict(base=str(family_dir(family)), out=str(tmp_path / "rm"), data=str(data),
                                                max_steps=12, batch_size=8, lr=3e-3, warmup_steps=0, save_every=0,
                                                eval_every=100, eval_fraction=0.25))
    out = reward.run(cfg)
    m = json.loads((out / "lifecycle.json").read_text())["metrics"]
    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert model.config.num_labels == 1
    assert m["eval_accuracy"] >= 0.9


def test_dora_on_a_mixture_of_experts_is_refused_in_one_line(family_dir, tmp_path):
    from lifecycle.errors import UsageError

    with pytest.raises(UsageError, match="DoRA .* mixture of experts.*use --lora"):
        _sft(family_dir("mixtral"), tmp_path / "sft", dora=True)


def test_the_reward_trainer_reads_the_scores_that_score_reads(chatml_tokenizer, family_dir, tmp_path):
    """With pad == EOS the stock classifier reads the token before EOS; our trainer reads the last attended
    token, so the rewards it trains are exactly `reward_model.score`'s."""
    import torch
    import trl
    from datasets import Dataset

    from lifecycle.modeling import REWARD_HEAD, load_for_training
    from lifecycle.reward_model import score
    from lifecycle.stages.reward import MaskReadRewardTrainer, pad_is_real, tokenize

    tok = chatml_tokenizer
    pairs = [{"chosen": "1 plus 2 equals 3", "rejected": "1 plus 2 equals 4 and more"},
             {"chosen": "5 plus 5 equals 10", "rejected": "5 plus 5 is 9"}]
    rows, _, _ = tokenize(tok, pairs, 64)
    assert pad_is_real(rows, tok.pad_token_id)
    from types import SimpleNamespace

    peft = SimpleNamespace(lora=False, qlora=False, dora=False)
    model = load_for_training(str(family_dir("qwen3")), peft, head=REWARD_HEAD, pad_token_id=tok.pad_token_id)
    args = trl.RewardConfig(output_dir=str(tmp_path), per_device_train_batch_size=2, report_to=[], use_cpu=True, bf16=False,
                            disable_dropout=True)
    trainer = MaskReadRewardTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                                     processing_class=tok)
    batch = next(iter(trainer.get_train_dataloader()))
    model.eval()
    with torch.no_grad():
        _, out = trainer.compute_loss(model, batch, return_outputs=True)
        stock = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.squeeze(-1)
    expected = score(model, tok, ["", ""], [p["chosen"] for p in pairs]) + score(model, tok, ["", ""], [p["rejected"] for p in pairs])
    assert out.logits.squeeze(-1).tolist() == pytest.approx(expected, abs=1e-5)
    assert not torch.allclose(stock, out.logits.squeeze(-1), atol=1e-4)  # what the stock forward would have trained


def test_pad_that_is_also_a_real_token_switches_to_mask_reading():
    from lifecycle.stages.reward import pad_is_real

    assert pad_is_real([{"chosen_ids": [5, 6, 0], "rejected_ids": [5, 7, 0]}], 0)
    assert not pad_is_real([{"chosen_ids": [5, 6, 1], "rejected_ids": [5, 7, 1]}], 0)


# ---------------------------------------------------------------------------
# pretrain from a transformers config.json of each family; generate from each
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("family", ALL)
def test_pretrain_from_a_config_json_of_each_family(family, chatml_tokenizer, tmp_path):
    config = tmp_path / f"{family}.json"
    d = family_config(family, chatml_tokenizer).to_dict()
    config.write_text(json.dumps(d))
    out = tmp_path / "pt"
    r = subprocess.run([sys.executable, "-m", "lifecycle", "pretrain", "--out", str(out), "--model", str(config),
                        "--set", "steps=3", "--set", "batch_size=4", "--set", "seq_len=32", "--set", "world_documents=300",
                        "--set", "vocab_size=300", "--set", "eval_every=3", "--set", "eval_batches=1",
                        "--set", "save_every=0", "--set", "warmup_steps=1"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == family
    m = json.loads((out / "lifecycle.json").read_text())["metrics"]
    assert m["eval_loss"] < m["eval_loss_initial"]


@pytest.mark.parametrize("family", ["qwen3", "gemma2", "qwen3_moe"])
def test_generate_runs_and_stops_at_the_end_of_turn(family, family_dir):
    r = subprocess.run([sys.executable, "-m", "lifecycle", "generate", "what is 1 plus 2 ?", "--model",
                        str(family_dir(family)), "--chat", "--max-new-tokens", "5"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]


def test_lora_under_16_bit_autocast_stores_the_frozen_base_in_16_bits(family_dir):
    """What the estimator counts: a 2-byte frozen base; adapters and the reward head's trained copy in fp32."""
    from types import SimpleNamespace

    import torch

    from lifecycle.modeling import REWARD_HEAD, load_for_training

    peft = SimpleNamespace(lora=True, qlora=False, dora=False, lora_r=4, lora_alpha=8, lora_dropout=0.0,
                           lora_target_modules="all-linear", mixed_precision="bf16")
    model = load_for_training(str(family_dir("qwen3")), peft, head=REWARD_HEAD, pad_token_id=0)
    assert {(p.dtype, p.requires_grad) for p in model.parameters()} == {(torch.bfloat16, False), (torch.float32, True)}
    peft.mixed_precision = "no"
    model = load_for_training(str(family_dir("qwen3")), peft)
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_llm_run_chains_every_stage_on_a_mixture_of_experts(chatml_tokenizer, tmp_path):
    """pretrain (from a qwen3_moe config.json) -> sft -> reward -> ppo through `llm run`."""
    config = tmp_path / "qwen3_moe.json"
    config.write_text(json.dumps(family_config("qwen3_moe", chatml_tokenizer).to_dict()))
    recipe = tmp_path / "moe.yaml"
    recipe.write_text(f"""
stages:
  pretrain: {{model: {config}, seq_len: 32, batch_size: 8, steps: 6, warmup_steps: 2, eval_every: 6, eval_batches: 2,
             world_documents: 300, vocab_size: 300, save_every: 0}}
  sft: {{steps: 4, batch_size: 8, warmup_steps: 1, eval_every: 4, world_examples: 32, eval_problems: 16, save_every: 0}}
  reward: {{steps: 4, batch_size: 8, warmup_steps: 1, eval_every: 4, world_prompts: 32, eval_problems: 16, save_every: 0}}
  ppo: {{steps: 2, prompts_per_rollout: 8, minibatch_size: 4, micro_batch_size: 4, ppo_epochs: 1, world_prompts: 32,
        eval_prompts: 8, eval_every: 2, gate_samples: 8, save_every: 0}}
eval: {{docs: 10, problems: 8, batch_size: 8, decontaminate: false}}
""")
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "lifecycle", "run", str(recipe), "--out", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    for stage in ("pretrain", "sft", "reward", "ppo"):
        m = json.loads((out / stage / "lifecycle.json").read_text())
        assert m["stage"] == stage
        assert json.loads((out / stage / "config.json").read_text())["model_type"] == "qwen3_moe"
    evaluated = json.loads((out / "eval" / "eval.json").read_text())["models"]
    assert list(evaluated) == ["pretrain", "sft", "ppo"] and all(m["language_modelling"]["bits_per_byte"] > 0 for m in evaluated.values())
