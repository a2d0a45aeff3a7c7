"""PPO's memory estimate follows its rollout chunk: the KV cache of generation holds the sequences sampled at
once (rollout_micro_batch_size, else the rollout batch per process), and --explain shows the same call's rows
as the check the run makes before loading weights."""

from __future__ import annotations

from lifecycle import memory, presets
from lifecycle.config import PPOConfig, build_config


def test_the_rollout_kv_cache_counts_the_sequences_sampled_at_once():
    cfg, _ = presets.load_model_config("llama-2-7b")
    per_seq = memory.kv_cache_bytes(cfg, 1, 512, 2)  # bf16 cache of one 512-token sequence
    small, big = (memory.estimate(cfg, stage="ppo", method="lora", batch_size=4, seq_len=512, rollout_batch_size=rb)
                  for rb in (8, 64))
    assert small.details["rollout_kv_cache_bytes"] == 8 * per_seq and big.details["rollout_kv_cache_bytes"] == 64 * per_seq
    assert big.details["rollout_total_bytes"] - small.details["rollout_total_bytes"] == 56 * per_seq
    same = [k for k in small.rows if k != "overhead_bytes"]  # (the allocator overhead follows the peak)
    assert [small.rows[k] for k in same] == [big.rows[k] for k in same]  # the update does not depend on the chunk
    assert memory.estimate(cfg, stage="ppo", method="lora", batch_size=4, seq_len=512).details["rollout_batch_size"] == 4
    assert "for 64 sequences sampled at once" in big.table()


def test_explain_uses_the_rollout_chunk(tiny_base, tmp_path, tmp_path_factory, tiny_tokenizer):
    from transformers import AutoModelForSequenceClassification

    from lifecycle.artifacts import save_model_artifact
    from lifecycle.modeling import model_config
    from lifecycle.ppo_plan import explain

    rc = model_config("llama-micro", len(tiny_tokenizer), tiny_tokenizer.eos_token_id, tiny_tokenizer.pad_token_id)
    rc.num_labels = 1
    rm = tmp_path_factory.mktemp("mem_rm")
    save_model_artifact(AutoModelForSequenceClassification.from_config(rc), tiny_tokenizer, rm, stage="reward",
                        config={}, metrics={"eval_accuracy": 0.9}, parent=None, seed=0)
    base = dict(policy=str(tiny_base), reward=str(rm), out=str(tmp_path / "o"), prompts_per_rollout=32,
                minibatch_size=16, micro_batch_size=4, world_prompts=64, eval_prompts=8, gate_samples=8)
    whole = explain(build_config(PPOConfig, None, base))
    chunked = explain(build_config(PPOConfig, None, {**base, "rollout_micro_batch_size": 8}))
    assert "for 32 sequences sampled at once" in whole and "for 8 sequences sampled at once" in chunked


def test_grpo_counts_only_the_roles_it_loads():
    """GRPO with kl_coef 0 loads no reference, and with a reward function no reward model: neither is counted."""
    cfg, _ = presets.load_model_config("llama-2-7b")
    full = memory.estimate(cfg, stage="grpo", batch_size=2, seq_len=512)
    lean = memory.estimate(cfg, stage="grpo", batch_size=2, seq_len=512, absent_roles=("reference", "reward"))
    roles = {r["role"]: r["bytes"] for r in full.roles}
    assert [r["role"] for r in lean.roles] == ["policy"]
    assert full.rows["params_bytes"] - lean.rows["params_bytes"] == roles["reference"] + roles["reward"]
    assert not any("counts a reference" in w for w in lean.warnings)
