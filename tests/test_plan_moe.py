"""plan()'s "moe" entry and planning.layouts.fitting_layouts: against formulas from the configs (experts'
parameters, balanced routing T·k/E, the roofline of one expert's GEMMs against its weights' bus traffic) and
against plan() itself."""
import pytest
import transformers

import horizon_triton as ht
from horizon_triton.models.generic.config import GenericConfig
from horizon_triton.planning.dryrun import dry_run
from horizon_triton.planning.known_models import known_model
from horizon_triton.planning.layouts import fitting_layouts, host_layouts
from horizon_triton.planning.moe import moe_summary
from horizon_triton.planning.plan import HARDWARE, format_plan, hardware_figures, plan

from generic_models import COMMON, FAMILIES

H100 = HARDWARE["h100"]
# one expert's GEMMs hide its weights (in twice in bf16, its gradient out once) at F·(2·2 B / B_in) / 8 FLOPs per
# parameter per token; a frozen expert (LoRA) moves no gradient and skips its weight-gradient GEMMs: 6
HIDE_TRAINED = H100["bf16_tflops"] * 1e12 * 4 / (H100["h2d_gbps"] * 1e9) / 8
HIDE_FROZEN = H100["bf16_tflops"] * 1e12 * 4 / (H100["h2d_gbps"] * 1e9) / 6


def _tiny(model_type: str, **overrides) -> GenericConfig:
    return GenericConfig.from_hf(transformers.AutoConfig.for_model(model_type, **{**COMMON, **FAMILIES[model_type],
                                                                                  **overrides}))


H = COMMON["hidden_size"]
WIDE = 512       # experts this wide dwarf the store buffers' rounding to whole pages


@pytest.mark.parametrize("model_type, width, experts_per_layer, layers", [
    # qwen3_moe: [E, 2I, H] + [E, H, I], no biases; layer 0 kept dense by mlp_only_layers
    ("qwen3_moe", "moe_intermediate_size", 4 * 3 * H * WIDE, 1),
    # gpt-oss: [E, H, 2I] + [E, I, H] with biases [E, 2I] and [E, H]
    ("gpt_oss", "intermediate_size", 4 * (3 * H * WIDE + 2 * WIDE + H), 2),
    # qwen3.5-moe: routed experts beside a shared expert (not counted) in both layers
    ("qwen3_5_moe_text", "moe_intermediate_size", 4 * 3 * H * WIDE, 2)])
def test_moe_entry_of_tiny_models_is_the_formula(model_type, width, experts_per_layer, layers):
    overrides = {width: WIDE, **({"mlp_only_layers": [0]} if model_type == "qwen3_moe" else {})}
    cfg = _tiny(model_type, **overrides)
    fields = FAMILIES[model_type]
    rows, seq = 2, 64
    result = plan(cfg, tokens_per_step=rows * seq, seq_len=seq, hardware="h100", find_hiding=False)
    moe = result["moe"]
    experts = experts_per_layer * layers
    k, e = fields["num_experts_per_tok"], 4
    assert (moe["experts_parameters"], moe["experts_layers"]) == (experts, layers)
    assert (moe["experts_per_layer"], moe["top_k"], moe["frozen"]) == (e, k, False)
    assert moe["tokens_per_expert"] == moe["tokens_per_expert_per_step"] == rows * seq * k / e
    assert moe["tokens_per_expert_to_hide"] == pytest.approx(HIDE_TRAINED)
    assert moe["tokens_per_micro_batch_to_hide"] == pytest.approx(HIDE_TRAINED * e / k)
    assert moe["hiding_ratio"] == pytest.approx(rows * seq * k / e / HIDE_TRAINED)
    # the store's buffers of a layer hold 14 B per parameter (whole pages): the experts' share of the store is
    # their share of the parameters, within the pages' rounding of these tiny buffers
    assert moe["experts_share_of_host_store"] == pytest.approx(experts / result["num_parameters"], rel=0.02)
    assert moe["experts_host_bytes"] == pytest.approx(14 * experts, rel=0.02)
    assert "experts " in format_plan(result) and f"top {k} of {e}" in format_plan(result)


def test_moe_entry_with_frozen_experts_and_none_without_experts():
    """LoRA: the experts are frozen (their weights cross in, no gradient out, no weight-gradient GEMMs), and their
    share of the host store is their share of the frozen base's bf16 bytes; a model without experts has no entry."""
    cfg = _tiny("qwen3_moe", moe_intermediate_size=WIDE)
    train = ht.TrainConfig(lora_rank=4)
    result = plan(cfg, train, tokens_per_step=128, seq_len=64, hardware="h100", find_hiding=False)
    moe = result["moe"]
    assert moe["frozen"] and moe["tokens_per_expert_to_hide"] == pytest.approx(HIDE_FROZEN)
    experts_bytes = 2 * moe["experts_parameters"]
    assert moe["experts_host_bytes"] == pytest.approx(experts_bytes, rel=0.02)
    assert moe["experts_host_bytes"] < result["lora"]["base_host_bytes"]
    dense = plan(_tiny("olmo2"), tokens_per_step=128, seq_len=64, hardware="h100", find_hiding=False)
    assert "moe" not in dense and "experts " not in format_plan(dense)


def test_moe_entry_of_gpt_oss_120b_at_full_size():
    """36 layers of 128 experts (top 4) of 2880 × 2880 with biases; 1 × 4096 tokens: 128 tokens an expert, 1.6%
    of the 8,000 that would hide its weights' traffic on an H100."""
    cfg = known_model("gpt-oss-120b")
    dry = dry_run(cfg, tokens_per_step=4096, seq_len=4096, device_memory_bytes=H100["device_memory_bytes"])
    moe = moe_summary(cfg, dry, hardware_figures("h100"))
    h = i = 2880
    experts = 36 * 128 * (3 * h * i + 2 * i + h)
    assert moe["experts_parameters"] == experts == 114_701_598_720
    assert moe["tokens_per_expert"] == 4096 * 4 / 128 == 128
    assert moe["hiding_ratio"] == pytest.approx(128 / 8000)
    assert moe["experts_share_of_host_store"] == pytest.approx(experts / cfg.num_parameters(), rel=1e-3)
    assert moe["experts_host_bytes"] == pytest.approx(14 * experts, rel=1e-3)


@pytest.mark.parametrize("name, k, skew", [("gpt-oss-120b", 4, 2.0), ("qwen3-235b-a22b", 8, 3.0)])
def test_skewed_routing_at_full_size(name, k, skew):
    """128 experts, 1 × 4096 tokens: the busiest expert gets skew × 4096·k/128 tokens; the grouped GEMM bound by
    it takes skew × as long for the same work, so it hides the experts' copies from 1/skew of the balanced tokens
    per micro-batch (the hiding point per expert, HIDE_TRAINED, is the same for every model)."""
    cfg = known_model(name)
    dry = dry_run(cfg, tokens_per_step=4096, seq_len=4096, device_memory_bytes=H100["device_memory_bytes"])
    moe = moe_summary(cfg, dry, hardware_figures("h100"), skew=skew)
    balanced = 4096 * k / 128
    assert (moe["top_k"], moe["experts_per_layer"], moe["skew"]) == (k, 128, skew)
    assert moe["tokens_per_expert"] == balanced and moe["tokens_per_expert_busiest"] == skew * balanced
    assert moe["experts_time_factor"] == skew
    assert moe["hiding_ratio_skewed"] == pytest.approx(skew * balanced / HIDE_TRAINED)
    assert moe["tokens_per_micro_batch_to_hide"] == pytest.approx(HIDE_TRAINED * 128 / k)
    assert moe["tokens_per_micro_batch_to_hide_skewed"] == pytest.approx(HIDE_TRAINED * 128 / k / skew)


def test_skew_is_capped_at_every_token_and_printed():
    """4 experts, top 2, 128 tokens: 4× skew would give the busiest expert 256 tokens, but a token picks an
    expert once: 128, twice the balanced 64; its copies then hide from HIDE_TRAINED tokens per micro-batch (the
    busiest expert gets them all). Skew below 1 is refused."""
    cfg = _tiny("qwen3_moe", moe_intermediate_size=WIDE)
    result = plan(cfg, tokens_per_step=128, seq_len=64, hardware="h100", find_hiding=False, moe_skew=4.0)
    moe = result["moe"]
    assert (moe["tokens_per_expert"], moe["tokens_per_expert_busiest"], moe["experts_time_factor"]) == (64, 128, 2)
    assert moe["tokens_per_micro_batch_to_hide_skewed"] == pytest.approx(HIDE_TRAINED)
    assert "busiest expert 4× balanced: 128 tokens" in format_plan(result)
    with pytest.raises(ValueError, match="moe skew 0.5"):
        plan(cfg, tokens_per_step=128, seq_len=64, hardware="h100", find_hiding=False, moe_skew=0.5)


def test_cli_plan_prints_the_skewed_routing(tmp_path, capsys):
    """``horizon-triton plan --moe-skew 3`` on a tiny qwen3_moe config: top 2 of 4 experts, 128 tokens a
    micro-batch, balanced 64 tokens an expert, the busiest 3 × 64 = 192 capped at the 128 tokens."""
    from horizon_triton import cli
    _tiny("qwen3_moe", moe_intermediate_size=WIDE).hf.save_pretrained(tmp_path)
    assert cli.main(["plan", "--model", str(tmp_path), "--tokens-per-step", "128", "--seq-len", "64",
                     "--host-ram", "2GB", "--moe-skew", "3"]) == 0
    out = capsys.readouterr().out
    assert "64 tokens per expert per micro-batch" in out and "busiest expert 3× balanced: 128 tokens" in out


def test_fitting_layouts_of_a_tiny_model_are_plans():
    """Each layout's host bytes are plan()'s at one row; with the host memory set to the 8-bit layout's bytes,
    the 14 B/param layout does not fit and the 8-bit one is the best: its device peak and tokens to hide are
    plan()'s (with the hiding search)."""
    cfg, seq = _tiny("qwen3_moe", moe_intermediate_size=WIDE), 64
    trains = list(host_layouts(lora_rank=4, lora_targets=("q_proj",)).values())
    plans = [plan(cfg, t, tokens_per_step=seq, seq_len=seq, hardware="h100", find_hiding=False) for t in trains]
    host = plans[1]["host_bytes"]
    out = fitting_layouts(cfg, host_memory_bytes=host, hardware="h100", seq_len=seq, lora_rank=4,
                          lora_targets=("q_proj",))
    assert [layout["host_bytes"] for layout in out["layouts"]] == [p["host_bytes"] for p in plans]
    assert plans[0]["host_bytes"] > host > plans[2]["host_bytes"]
    assert [layout["fits_host"] for layout in out["layouts"]] == [False, True, True]
    best = out["best"]
    assert best["name"] == out["layouts"][1]["name"] and best["device_peak_bytes"] == plans[1]["device_peak_bytes"]
    hiding = plan(cfg, trains[1], tokens_per_step=seq, seq_len=seq, hardware="h100")["tokens_to_hide_transfers"]
    assert best["tokens_to_hide_transfers"] == hiding is not None
    assert fitting_layouts(cfg, host_memory_bytes=plans[2]["host_bytes"] - 1, hardware="h100", seq_len=seq,
                           lora_rank=4, lora_targets=("q_proj",))["best"] is None


@pytest.mark.slow
def test_fitting_layouts_of_gpt_oss_120b_on_a_1_5_tb_host():
    """gpt-oss-120b (116.8B) on 1.5 TB: 14 B/param (1.64 TB) does not fit, 8 B/param (+ the 8-bit moments' scales)
    and LoRA (the frozen bf16 base, 2 B/param, + adapters and the step's buffers) do; per-parameter formulas."""
    cfg = known_model("gpt-oss-120b")
    n = cfg.num_parameters()
    out = fitting_layouts(cfg, host_memory_bytes=int(1.5e12), hardware="h100", find_hiding=False)  # the tiny
    # model's test checks the search against plan()'s
    per_param = [layout["host_bytes"] / n for layout in out["layouts"]]
    assert 14 <= per_param[0] < 14.001 and 8 < per_param[1] < 8 + 2 * 4 / 256 + 0.002 and 2 < per_param[2] < 2.01
    assert [layout["fits_host"] for layout in out["layouts"]] == [False, True, True]
    assert out["best"]["name"].startswith("8 B/param") and out["best"]["plan"]["moe"]["top_k"] == 4
    assert out["best"]["tokens_to_hide_transfers"] is None
