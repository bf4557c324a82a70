"""Forward-only passes (Engine.evaluate, reference_logps, evaluate_preferences, logits; scheduler.run_forward):
layer-major over groups of micro-batches, so the weights cross the bus once per group whatever the number of
batches (counted by the pipeline's DeviceMeter), hidden states beyond the checkpoint budget waiting on the host.
The numbers match transformers, and are bit-identical whatever the grouping, the offloading and the async test
device's stream timing (a missing wait there reads a half-copied state and changes them)."""
import pytest
import torch
import torch.nn.functional as F

import horizon_triton as ht
from horizon_triton.schedule.activations import IN_FLIGHT
from hf_reference import load_hf, make_hf_model, random_batches

SEQ, ROWS, HEAD_ROWS = 12, 2, 40       # 96-token vocabulary: the head streams in 3 chunks


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("forward")
    make_hf_model("llama", root / "policy", seed=0)
    make_hf_model("llama", root / "reference", seed=3)
    return root


def _engine(src, **train):
    settings = dict(device="cpu", compute_dtype="float32", head_chunk_rows=HEAD_ROWS)
    settings.update(train)
    return ht.Engine(ht.ModelConfig.from_pretrained(src), ht.TrainConfig(**settings))


def _state_bytes(engine) -> int:
    """One micro-batch's hidden state: T·H in the compute dtype."""
    return ROWS * SEQ * engine.model_cfg.hidden_size * engine.compute_dtype.itemsize


def _weight_bytes(engine) -> int:
    """What one pass of the weights moves: every decoder layer, and the head's chunks (each with the final norm)."""
    p, H = engine.pipeline, engine.model_cfg.hidden_size
    decoders = sum(engine.store.working[i].numel() for i in range(1, p.head))
    head = sum((u.stop - u.start + 1) * H for u in p.head_chunks())
    return (decoders + head) * engine.compute_dtype.itemsize


def _bus(engine, run) -> tuple[int, int, int]:
    """(bytes in, bytes out, peak device bytes above what the pipeline holds) of run()."""
    meter = engine.pipeline.meter
    meter.reset_peak()
    h2d, d2h, held = meter.h2d_bytes, meter.d2h_bytes, meter.held
    run()
    assert meter.held == held                        # the pass leaves nothing behind on the device
    return meter.h2d_bytes - h2d, meter.d2h_bytes - d2h, meter.peak - held


PASSES = {"evaluate": lambda engine, batches: engine.evaluate(batches),
          "reference_logps": lambda engine, batches: list(engine.reference_logps(batches))}


@pytest.mark.parametrize("what", PASSES)
def test_weights_cross_once_per_pass_whatever_the_batch_count(models, what):
    """All batches in one group (the budget holds them): the weights once, plus each batch's embedding rows."""
    engine = _engine(models / "policy", checkpoint_budget_bytes=1 << 30)
    weights, state = _weight_bytes(engine), _state_bytes(engine)
    for n in (1, 8):
        h2d, d2h, _ = _bus(engine, lambda: PASSES[what](engine, random_batches(n, 96, ROWS, SEQ)))
        assert (h2d, d2h) == (weights + n * state, 0)
    engine.close()


@pytest.mark.parametrize("accum, kept", [(1, 0), (4, 3)])
def test_groups_and_waiting_states_follow_the_budget(models, accum, kept):
    """A group is grad_accum_steps × layers micro-batches (2 layers here), more while the checkpoint budget holds
    them; the budget keeps ``kept`` states on the device, the others wait on the host and cross for every unit:
    back in before it (2 decoders + 3 head chunks), out after the decoders and the first chunk (which norms)."""
    state = ROWS * SEQ * 64 * 4                     # hidden 64, fp32
    engine = _engine(models / "policy", grad_accum_steps=accum, checkpoint_budget_bytes=kept * state)
    weights, n = _weight_bytes(engine), 8
    assert _state_bytes(engine) == state
    groups = -(-n // (accum * 2))
    waiting = n - kept * groups
    h2d, d2h, peak = _bus(engine, lambda: engine.evaluate(random_batches(n, 96, ROWS, SEQ)))
    assert h2d == groups * weights + kept * groups * state + waiting * 5 * state
    assert d2h == waiting * 3 * state
    # the device holds the kept states, and at most IN_FLIGHT waiting ones coming in and as many going out
    assert peak <= (kept + 2 * IN_FLIGHT) * state
    engine.close()


def _hf_token_logps(model, batch) -> torch.Tensor:
    """[B, S] label-aligned log-probabilities of the labelled tokens (0 elsewhere), from transformers."""
    with torch.no_grad():
        logps = F.log_softmax(model(input_ids=batch["input_ids"]).logits.float(), dim=-1)
    labels = batch["labels"]
    out = torch.zeros(labels.shape)
    picked = logps[:, :-1].gather(-1, labels[:, 1:].clamp(min=0)[..., None])[..., 0]
    out[:, 1:] = torch.where(labels[:, 1:] != -100, picked, 0.0)
    return out


# every way of running a pass gives the same bits: one group on the synchronous device; groups of 2 batches,
# every state waiting on the host; one group of 8 with 3 states kept; both on the async device
WAYS = [dict(), dict(grad_accum_steps=1, checkpoint_budget_bytes=0),
        dict(device="cpu-async", grad_accum_steps=1, checkpoint_budget_bytes=0),
        dict(device="cpu-async", grad_accum_steps=4, budget_states=3)]


def _engine_way(src, way):
    way = dict(way)
    states = way.pop("budget_states", None)
    if states is not None:
        way["checkpoint_budget_bytes"] = states * ROWS * SEQ * 64 * 4
    return _engine(src, **way)


def test_evaluate_and_reference_logps_match_transformers_bit_identically_every_way(models):
    batches = random_batches(8, 96, ROWS, SEQ, seed=5)
    hf = load_hf(models / "policy")
    want = [_hf_token_logps(hf, b) for b in batches]
    labelled = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
    want_loss = -sum(float(w.sum()) for w in want) / labelled
    results = []
    for way in WAYS:
        engine = _engine_way(models / "policy", way)
        got = list(engine.reference_logps(batches))
        loss = engine.evaluate(batches)
        one_by_one = [next(iter(engine.reference_logps([b]))) for b in batches]  # a group each: the old pass
        engine.close()
        for g, w, alone in zip(got, want, one_by_one):
            torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
            assert torch.equal(g, alone)
        assert loss == pytest.approx(want_loss, rel=1e-5)
        results.append((got, loss))
    for got, loss in results[1:]:
        assert loss == results[0][1]
        assert all(torch.equal(a, b) for a, b in zip(got, results[0][0]))


def test_dpo_reference_pass_and_evaluation_match_transformers_every_way(models):
    """DPO: the reference pass from one model, the policy's evaluation from another; TRL's sigmoid loss and
    rewards from transformers' log-probs of both."""
    batches = random_batches(6, 96, ROWS, SEQ, seed=7)      # one pair a batch: rows 0 (chosen) and 1 (rejected)
    hf_policy, hf_reference = load_hf(models / "policy"), load_hf(models / "reference")
    policy = torch.stack([_hf_token_logps(hf_policy, b).sum(1) for b in batches])      # [6, 2]
    reference = torch.stack([_hf_token_logps(hf_reference, b).sum(1) for b in batches])
    outcomes = []
    for way in WAYS:
        ref_engine = _engine_way(models / "reference", dict(way, objective="dpo"))
        refs = list(ref_engine.reference_logps(batches))
        ref_engine.close()
        engine = _engine_way(models / "policy", dict(way, objective="dpo"))
        scores = engine.evaluate_preferences([dict(b, ref_logps=r) for b, r in zip(batches, refs)])
        engine.close()
        outcomes.append((refs, scores))
        beta = engine.train_cfg.dpo_beta
        margin = beta * ((policy[:, 0] - reference[:, 0]) - (policy[:, 1] - reference[:, 1]))
        assert scores["pairs"] == 6
        assert scores["loss"] == pytest.approx(float(-F.logsigmoid(margin).mean()), rel=1e-5)
        assert scores["rewards/chosen"] == pytest.approx(float(beta * (policy - reference)[:, 0].mean()),
                                                         rel=1e-4, abs=1e-6)
    for refs, scores in outcomes[1:]:
        assert scores == outcomes[0][1]
        assert all(torch.equal(a, b) for a, b in zip(refs, outcomes[0][0]))


def test_logits_are_the_same_on_the_async_device_with_the_state_waiting_on_the_host(models):
    ids = random_batches(1, 96, 3, 20, seed=9)[0]["input_ids"]
    want = load_hf(models / "policy")(ids).logits.detach()
    got = []
    for way in (dict(), dict(device="cpu-async", checkpoint_budget_bytes=0)):
        engine = _engine(models / "policy", **way)
        got.append(engine.logits(ids))
        engine.close()
    torch.testing.assert_close(got[0], want, atol=1e-4, rtol=1e-4)
    assert torch.equal(got[0], got[1])
