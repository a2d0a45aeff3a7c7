"""Every published preset's parameter count against the figure its authors published.

The presets in lifecycle/presets.py are architecture fields written out by hand
(nothing is downloaded), so a wrong hidden size, head count or tie flag shows up
here: the count from the config's numbers (memory_arch.params_formula; the
estimator's closed form where it has one) must match the published figure, and
for a sample of presets so must the count read off the real transformers module
built on fake tensors (the estimator's generic path).

Tolerances: the exact figure where the source gives one (rel 1e-6); where a model
card rounds ("8.2B") the rounding of the card's last digit.
"""

from __future__ import annotations

import pytest

from lifecycle import memory, presets
from lifecycle.memory_arch import params_formula

# name -> (published parameters, relative tolerance, source)
PUBLISHED_FIGURES = {
    # Qwen3 technical report (arXiv 2505.09388), Table 1, and the Qwen/Qwen3-* model cards ("Number of Parameters").
    "qwen3-0.6b": (0.6e9, 0.01, "Qwen/Qwen3-0.6B model card: 0.6B"),
    "qwen3-1.7b": (1.7e9, 0.02, "Qwen/Qwen3-1.7B model card: 1.7B"),
    "qwen3-4b": (4.0e9, 0.01, "Qwen/Qwen3-4B model card: 4.0B"),
    "qwen3-8b": (8.2e9, 0.01, "Qwen/Qwen3-8B model card: 8.2B"),
    "qwen3-14b": (14.8e9, 0.005, "Qwen/Qwen3-14B model card: 14.8B"),
    "qwen3-32b": (32.8e9, 0.005, "Qwen/Qwen3-32B model card: 32.8B"),
    "qwen3-30b-a3b": (30.5e9, 0.005, "Qwen/Qwen3-30B-A3B model card: 30.5B total, 3.3B activated"),
    # Llama 3.2 model card (meta-llama/Llama-3.2-1B): "1B (1.23B)", "3B (3.21B)".
    "llama-3.2-1b": (1.23e9, 0.01, "meta-llama/Llama-3.2-1B model card: 1.23B"),
    "llama-3.2-3b": (3.21e9, 0.005, "meta-llama/Llama-3.2-3B model card: 3.21B"),
    # Llama 3.1: HF num_parameters() of meta-llama/Llama-3.1-8B / -70B.
    "llama-3.1-8b": (8_030_261_248, 1e-6, "meta-llama/Llama-3.1-8B: 8,030,261,248 (safetensors metadata)"),
    "llama-3.1-70b": (70_553_706_496, 1e-6, "meta-llama/Llama-3.1-70B: 70,553,706,496 (safetensors metadata)"),
    # Gemma 2 report (arXiv 2408.00118), Table 2: non-embedding 2,024,517,888 / 8,324,201,984 plus the
    # embeddings; the model cards round to 2.61B and 9.24B.
    "gemma-2-2b": (2.61e9, 0.005, "Gemma 2 report Table 2 / google/gemma-2-2b card: 2.61B"),
    "gemma-2-9b": (9.24e9, 0.005, "Gemma 2 report Table 2 / google/gemma-2-9b card: 9.24B"),
    # Gemma 3 report (arXiv 2503.19786), Table 1: embedding + non-embedding parameters (the text part).
    "gemma-3-1b": (302e6 + 698e6, 0.005, "Gemma 3 report Table 1: 302M embedding + 698M non-embedding"),
    "gemma-3-4b": (675e6 + 3209e6, 0.005, "Gemma 3 report Table 1: 675M embedding + 3,209M non-embedding"),
    "gemma-3-12b": (1012e6 + 10759e6, 0.005, "Gemma 3 report Table 1: 1,012M embedding + 10,759M non-embedding"),
    # Phi-3 report (arXiv 2404.14219): "phi-3-mini, a 3.8 billion parameter language model".
    "phi-3-mini": (3.8e9, 0.01, "Phi-3 technical report, sec. 1: 3.8B"),
    # Mistral 7B: HF num_parameters() of mistralai/Mistral-7B-v0.1; the paper says 7B.
    "mistral-7b": (7_241_732_096, 1e-6, "mistralai/Mistral-7B-v0.1: 7,241,732,096 (safetensors metadata)"),
    # Mixtral of Experts (arXiv 2401.04088): "47B total parameters"; HF: 46,702,792,704.
    "mixtral-8x7b": (46_702_792_704, 1e-6, "mistralai/Mixtral-8x7B-v0.1: 46,702,792,704 (safetensors metadata)"),
    # SmolLM2 model cards (HuggingFaceTB/SmolLM2-*): 135M, 360M, 1.7B.
    "smollm2-135m": (135e6, 0.005, "HuggingFaceTB/SmolLM2-135M model card: 135M"),
    "smollm2-360m": (360e6, 0.01, "HuggingFaceTB/SmolLM2-360M model card: 360M"),
    "smollm2-1.7b": (1.7e9, 0.01, "HuggingFaceTB/SmolLM2-1.7B model card: 1.7B"),
}
# Counted also from the real module on fake tensors (a few seconds each; MoE, sandwich norms, QK-norm, fused MLP).
TRACED = ("smollm2-135m", "qwen3-0.6b", "gemma-2-2b", "gemma-3-1b", "phi-3-mini", "qwen3-30b-a3b")

REQUIRED = ("qwen3-0.6b", "qwen3-1.7b", "qwen3-4b", "qwen3-8b", "qwen3-14b", "qwen3-32b", "qwen3-30b-a3b",
            "llama-3.2-1b", "llama-3.2-3b", "llama-3.1-8b", "llama-3.1-70b", "gemma-2-2b", "gemma-2-9b", "gemma-3-1b",
            "gemma-3-4b", "gemma-3-12b", "phi-3-mini", "mistral-7b", "mixtral-8x7b", "smollm2-135m", "smollm2-360m",
            "smollm2-1.7b")


def test_every_required_preset_exists_and_has_a_published_figure():
    assert set(REQUIRED) <= set(presets.PUBLISHED)
    assert set(REQUIRED) <= set(PUBLISHED_FIGURES)


@pytest.mark.parametrize("name", sorted(PUBLISHED_FIGURES))
def test_formula_count_matches_the_published_figure(name):
    published, rel, _source = PUBLISHED_FIGURES[name]
    cfg, label = presets.load_model_config(name)
    assert label == name
    n = params_formula(cfg)
    assert n == pytest.approx(published, rel=rel), f"{name}: {n:,} vs published {published:,.0f}"
    try:                                    # the estimator's own closed form, where the family has one
        closed = memory.count_params(memory.shape_from_config(cfg))
    except memory.NoClosedForm:
        return
    assert closed == n


@pytest.mark.parametrize("name", TRACED)
def test_traced_module_count_matches(name):
    pytest.importorskip("torch")
    cfg, _ = presets.load_model_config(name)
    traced = memory.count_params(memory.generic_shape(cfg))
    assert traced == params_formula(cfg)
    published, rel, _ = PUBLISHED_FIGURES[name]
    assert traced == pytest.approx(published, rel=rel)


def test_hub_ids_and_aliases_resolve():
    assert presets.load_model_config("Qwen/Qwen3-8B")[1] == "qwen3-8b"
    assert presets.load_model_config("meta-llama/Llama-3.2-1B-Instruct")[1] == "llama-3.2-1b"
    assert presets.load_model_config("google/gemma-2-9b-it")[0]["model_type"] == "gemma2"


def test_mixture_of_experts_counts_every_expert_and_the_router():
    """Mixtral 8x7B: 8 experts x 3 matrices (4096 x 14336) per layer plus an 8 x 4096 router, 32 layers."""
    cfg, _ = presets.load_model_config("mixtral-8x7b")
    dense = dict(cfg, model_type="mistral")
    dense.pop("num_local_experts")
    assert params_formula(cfg) - params_formula(dense) == 32 * (7 * 3 * 4096 * 14336 + 8 * 4096)
