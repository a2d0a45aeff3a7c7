"""`llm sft`: short runs on the tiny fixtures (full, LoRA, QLoRA, DoRA), the artifact, and bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lifecycle.config import SFTConfig, build_config
from lifecycle.errors import UsageError

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

# Hand count of LoRA parameters on the tiny Llama (hidden 32, 4 heads of 8 with
# 2 KV heads -> k/v width 16, MLP 64, 2 layers) at rank r = 8. A linear layer
# d_in -> d_out gets A (r x d_in) and B (d_out x r): r * (d_in + d_out).
#   q_proj, o_proj  32 -> 32: 8 * 64 = 512 each      1,024
#   k_proj, v_proj  32 -> 16: 8 * 48 = 384 each        768
#   gate, up        32 -> 64: 8 * 96 = 768 each      1,536
#   down            64 -> 32: 8 * 96 = 768             768
#                                       per layer    4,096  x 2 layers = 8,192
# DoRA adds one magnitude per output feature: 32+16+16+32+64+64+32 = 256 per layer.
# The base itself: embeddings 300 x 32 (tied to the output) + per layer q 1,024, k 512, v 512, o 1,024,
# gate/up/down 2,048 each, two norms 64 (= 9,280) + the final norm 32.
BASE_PARAMS = 300 * 32 + 2 * 9_280 + 32  # 28,192
LORA_PARAMS = 8_192
DORA_EXTRA = 512


def sft_cfg(base, out, **kw):
    values = dict(base=str(base), out=str(out), max_steps=2, world_examples=32, eval_problems=8, batch_size=8,
                  eval_batch_size=16, warmup_steps=0, save_every=0, log_every=1, eval_every=100)
    values.update(kw)
    return build_config(SFTConfig, None, values)


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory, tiny_base):
    """One short run per mode, shared by the tests below."""
    from lifecycle.stages import sft

    cache: dict[str, Path] = {}

    def get(mode: str) -> Path:
        if mode not in cache:
            out = tmp_path_factory.mktemp(f"sft_{mode}")
            flags = {} if mode == "full" else {mode: True}
            if mode == "full":
                flags.update(save_every=2)
            cache[mode] = sft.run(sft_cfg(tiny_base, out, **flags))
        return cache[mode]

    return get


def manifest(path: Path) -> dict:
    return json.loads((Path(path) / "lifecycle.json").read_text())


def test_full_finetune_writes_a_complete_artifact(sft_run, tiny_base, tiny_tokenizer):
    import torch
    from safetensors.torch import load_file

    out = sft_run("full")
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "lifecycle.json", "log.jsonl"} <= files
    assert not (out / "adapter").exists()
    m = manifest(out)
    assert m["stage"] == "sft" and m["kind"] == "causal-lm" and m["mode"] == "full"
    assert m["parent"]["path"] == str(Path(tiny_base).resolve()) and m["parent"]["digest"]
    for key in ("eval_loss", "gold_accuracy", "gold_accuracy_initial", "gold_accuracy_carry", "gold_accuracy_nocarry"):
        assert key in m["metrics"], key
    assert len(tiny_tokenizer) == 300  # the vocabulary the hand count above assumes
    assert m["metrics"]["trainable_params"] == m["metrics"]["total_params"] == BASE_PARAMS
    before, after = load_file(Path(tiny_base) / "model.safetensors"), load_file(out / "model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before), "no weight changed"
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert all("step" in row for row in log)
    assert any("loss" in row for row in log) and any("eval_loss" in row for row in log)
    assert (out / "checkpoints" / "checkpoint-2").is_dir()


def test_resume_continues_from_the_checkpoint(sft_run, tiny_base, capsys):
    from lifecycle.stages import sft

    out = sft_run("full")
    sft.run(sft_cfg(tiny_base, out, max_steps=3, resume=True))
    assert manifest(out)["metrics"]["steps"] == 3
    assert "step     3/3" in capsys.readouterr().out


def test_collated_batch_masks_the_prompt(tiny_base, tiny_tokenizer, tmp_path):
    """The loss is on the assistant's answer only: in a collated training batch every prompt position
    (the rendered user turn up to and including the assistant header) has label -100, and every answer
    position its own token id."""
    from lifecycle.modeling import CAUSAL_HEAD, load_for_training
    from lifecycle.stages import sft

    cfg = sft_cfg(tiny_base, tmp_path / "o")
    cfg.max_length = 64
    _, train_rows, eval_rows = sft.load_rows(cfg)
    model = load_for_training(str(tiny_base), cfg, head=CAUSAL_HEAD)
    trainer = sft.build_trainer(cfg, model, tiny_tokenizer, train_rows, eval_rows, resuming=False)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    for i in range(4):
        row = trainer.train_dataset[i]
        n_prompt = len(tiny_tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=True,
                                                          return_dict=True)["input_ids"])
        ids, labels = batch["input_ids"][i], batch["labels"][i]
        n = int(batch["attention_mask"][i].sum())
        assert 0 < n_prompt < n
        assert labels[:n_prompt].tolist() == [-100] * n_prompt
        assert labels[n_prompt:n].tolist() == ids[n_prompt:n].tolist()


def _load_tensors(path: Path) -> dict:
    import torch
    from safetensors.torch import load_file

    if path.suffix == ".safetensors":
        return load_file(str(path))
    state = torch.load(path, weights_only=True)["state"]
    return {f"{k}.{n}": v for k, s in state.items() for n, v in s.items() if hasattr(v, "shape")}


def test_resume_equals_an_uninterrupted_run(tiny_tokenizer, tmp_path):
    """4 steps in one process, and the same run resumed from its step-2 checkpoint in a second process, end with
    equal weights and optimizer state (a GPT-2 base with dropout 0.1, so the restored RNG matters too); the
    held-out loss falls from step 2 to step 4."""
    import shutil

    import torch
    import yaml

    from lifecycle.artifacts import save_model_artifact
    from lifecycle.modeling import build_model, model_config
    from lifecycle.stages import sft

    spec = tmp_path / "gpt2-dropout.json"
    spec.write_text(json.dumps({"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 4, "n_inner": 64,
                                "n_positions": 128, "resid_pdrop": 0.1, "embd_pdrop": 0.1, "attn_pdrop": 0.1}))
    torch.manual_seed(0)
    tok = tiny_tokenizer
    base = tmp_path / "base"
    save_model_artifact(build_model(model_config(str(spec), len(tok), tok.eos_token_id, tok.pad_token_id)), tok, base,
                        stage="pretrain", config={"model": str(spec)}, metrics={}, parent=None, seed=0)
    out = tmp_path / "o"
    values = dict(base=str(base), out=str(out), max_steps=4, world_examples=32, eval_problems=8, batch_size=8,
                  eval_batch_size=16, warmup_steps=0, save_every=2, log_every=1, eval_every=2, lr=1e-3)
    sft.run(build_config(SFTConfig, None, values))
    final = out / "checkpoints" / "checkpoint-4"
    whole = {f: _load_tensors(final / f) for f in ("model.safetensors", "optimizer.pt")}
    evals = [r["eval_loss"] for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "eval_loss" in r]
    assert len(evals) >= 2 and evals[1] < evals[0]
    shutil.rmtree(final)
    recipe = tmp_path / "sft.yaml"
    recipe.write_text(yaml.safe_dump({k: v for k, v in values.items() if k not in ("base", "out")}))
    proc = run_cli("sft", "--config", str(recipe), "--base", str(base), "--out", str(out), "--resume")
    assert proc.returncode == 0, proc.stderr[-2000:]
    for f, tensors in whole.items():
        again = _load_tensors(final / f)
        assert again.keys() == tensors.keys() and all(torch.equal(again[k], tensors[k]) for k in tensors), f


def test_resume_without_checkpoint_is_refused(tiny_base, tmp_path):
    from lifecycle.stages import sft

    with pytest.raises(UsageError, match="no checkpoint under .*drop --resume"):
        sft.run(sft_cfg(tiny_base, tmp_path / "new", resume=True))


@pytest.mark.parametrize("mode", ["lora", "qlora", "dora"])
def test_adapters_train_the_hand_counted_parameters_and_load_in_stock_peft(sft_run, tiny_base, tiny_tokenizer, mode):
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    out = sft_run(mode)
    m = manifest(out)["metrics"]
    lora = LORA_PARAMS + (DORA_EXTRA if mode == "dora" else 0)
    assert m["trainable_params"] == lora
    assert m["total_params"] == BASE_PARAMS + lora
    adapter_cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter_cfg["use_dora"] == (mode == "dora") and adapter_cfg["r"] == 8
    weights = load_file(out / "adapter" / "adapter_model.safetensors")
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in weights.items()), "lora_B still zero: nothing trained"

    # Stock peft on the stock base gives the same logits as our merged model at OUT.
    ids = tiny_tokenizer.apply_chat_template([{"role": "user", "content": "what is 48 plus 87 ?"}], add_generation_prompt=True,
                                             return_tensors="pt", return_dict=True)["input_ids"]
    stock = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), out / "adapter").eval()
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(stock(ids).logits, merged(ids).logits, atol=1e-5, rtol=1e-4)


def test_qlora_artifact_reloads_and_generates(sft_run):
    from lifecycle.generate import generate_batch, render_prompts
    from lifecycle.modeling import load_causal_lm
    from lifecycle.tokenizer import load_tokenizer

    out = sft_run("qlora")
    tok, model = load_tokenizer(str(out)), load_causal_lm(str(out))
    prompts = render_prompts(tok, [[{"role": "user", "content": "what is 1 plus 2 ?"}]])
    (sample,) = generate_batch(model, tok, prompts, max_new_tokens=4)
    # Either it stopped at a stop id (its last token) or it ran to the limit; the text decodes its tokens.
    from lifecycle.generate import stop_ids

    stops = stop_ids(tok, model)
    assert (sample.ended and sample.token_ids[-1] in stops) or (not sample.ended and len(sample.token_ids) == 4)
    assert sample.text == tok.decode([t for t in sample.token_ids if t not in stops], skip_special_tokens=True)


def test_no_merge_keeps_only_the_adapter(tiny_base, tmp_path):
    from lifecycle.stages import sft

    out = sft.run(sft_cfg(tiny_base, tmp_path / "nm", lora=True, merge=False, max_steps=1, eval_problems=0))
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert not (out / "model.safetensors").exists()
    assert "adapter/adapter_model.safetensors" in manifest(out)["files"]


def test_user_messages_data_with_long_rows_is_truncated_and_counted(tiny_base, tmp_path, capsys):
    from lifecycle.stages import sft

    data = tmp_path / "chat.jsonl"
    rows = [json.loads(line) for line in (EXAMPLES / "sft_messages.jsonl").read_text().splitlines()]
    rows.append({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "la " * 40}]})
    data.write_text("".join(json.dumps(r) + "\n" for r in rows * 2))
    out = sft.run(sft_cfg(tiny_base, tmp_path / "o", data=[str(data)], max_length=64, max_steps=1, eval_fraction=0.2))
    text = capsys.readouterr().out
    assert "2 of 10 rows are longer than max_length=64" in text
    m = manifest(out)["metrics"]
    assert m["truncated_rows"] == 2 and "eval_loss" in m and "gold_accuracy" not in m


# ---------------------------------------------------------------------------
# Bad input through the CLI: exit 2, one `error:` line, no traceback
# ---------------------------------------------------------------------------
def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lifecycle", *args], capture_output=True, text=True, timeout=120)


def assert_usage_error(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    for f in fragments:
        assert f in lines[0], lines[0]
    return lines[0]


def test_cli_missing_columns(tiny_base, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"question": "q", "answer": "a"}\n')
    proc = run_cli("sft", "--base", str(tiny_base), "--out", str(tmp_path / "o"), "--data", str(data))
    assert_usage_error(proc, "columns answer, question", "prompt_column=NAME")


def test_cli_empty_file(tiny_base, tmp_path):
    data = tmp_path / "empty.jsonl"
    data.write_text("")
    assert_usage_error(run_cli("sft", "--base", str(tiny_base), "--out", str(tmp_path / "o"), "--data", str(data)), "is empty")


def test_cli_base_that_is_not_a_causal_lm(tmp_path):
    base = tmp_path / "bert"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"architectures": ["BertModel"], "model_type": "bert"}))
    import torch
    from safetensors.torch import save_file

    save_file({"embeddings.weight": torch.zeros(2, 2)}, str(base / "model.safetensors"))
    proc = run_cli("sft", "--base", str(base), "--out", str(tmp_path / "o"))
    assert_usage_error(proc, "unknown kind", "causal-lm is expected")


def test_cli_sft_refuses_a_reward_model(tmp_path, tiny_tokenizer):
    import torch
    from transformers import AutoModelForSequenceClassification

    from lifecycle.artifacts import save_model_artifact
    from lifecycle.modeling import model_config

    torch.manual_seed(0)
    cfg = model_config("llama-micro", len(tiny_tokenizer), tiny_tokenizer.eos_token_id, tiny_tokenizer.pad_token_id)
    cfg.num_labels = 1
    rm = AutoModelForSequenceClassification.from_config(cfg)
    save_model_artifact(rm, tiny_tokenizer, tmp_path / "rm", stage="reward", config={}, metrics={}, parent=None, seed=0)
    proc = run_cli("sft", "--base", str(tmp_path / "rm"), "--out", str(tmp_path / "o"))
    assert_usage_error(proc, "reward-model artifact from `llm reward`", "causal-lm is expected")


def test_cli_lora_and_qlora_together(tiny_base, tmp_path):
    proc = run_cli("sft", "--base", str(tiny_base), "--out", str(tmp_path / "o"), "--lora", "--qlora")
    assert_usage_error(proc, "--lora and --qlora both given")


def test_default_recipe_restates_the_builtin_defaults():
    from lifecycle.config import read_yaml

    defaults = SFTConfig()
    root = Path(__file__).resolve().parent.parent
    for k, v in read_yaml(root / "recipes/default/sft.yaml").items():
        assert getattr(defaults, k) == v, k
    gpu = build_config(SFTConfig, str(root / "recipes/gpu/sft-qlora.yaml"), {"out": "x", "base": "y"})
    assert gpu.qlora and gpu.mixed_precision == "bf16"
