"""ODA: the loss (fp32, masked), distillation lowering it, bridge-only training, re-alignment."""

from __future__ import annotations

import copy

import pytest
import torch

from coordinator.model.datasets import public_text
from coordinator.model.distillation_loss import distillation_loss
from coordinator.model.evaluation import tokenize_texts
from coordinator.model.oda import (
    ODAConfig,
    distill,
    evaluate_distillation_loss,
    trainable_layer_indices,
)
from coordinator.model.plugged_adapter import plugged_adapter
from coordinator.model.surgery import (
    build_submodel,
    capture_layer_io,
    find_decoder_layers,
)
from shared.adapters import LoraSettings, to_sub_keys
from shared.errors import ConfigError
from tests.coordinator.arch_models import VOCAB, tiny_model

KEPT = [0, 2, 3]  # of the 4-layer cut copy: layer 1 pruned, sub-LLM layer 1 is the bridge
LORA = LoraSettings(rank=4, alpha=8.0, dropout=0.0, target_modules=("q_proj", "v_proj"))


@pytest.fixture(scope="module")
def batches(smol):
    _, tokenizer = smol
    return tokenize_texts(tokenizer, public_text("wikipedia", n=8), max_length=48, batch_size=4)


def layer_states(model) -> list[dict[str, torch.Tensor]]:
    _, layers = find_decoder_layers(model)
    return [{k: v.clone() for k, v in layer.state_dict().items()} for layer in layers]


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def random_adapter(model, layers: list[int], seed: int = 0) -> dict[str, torch.Tensor]:
    """A LoRA adapter with PEFT keys and non-zero A and B on the given layers."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    torch.manual_seed(seed)
    peft_model = get_peft_model(
        copy.deepcopy(model),
        LoraConfig(r=LORA.rank, lora_alpha=LORA.alpha, target_modules=list(LORA.target_modules), layers_to_transform=layers, layers_pattern="layers"),
    )
    state = get_peft_model_state_dict(peft_model)
    return {k: torch.randn_like(v) * 0.05 for k, v in state.items()}


def peft_with(model, adapter: dict[str, torch.Tensor], layers: list[int]):
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    peft_model = get_peft_model(
        copy.deepcopy(model),
        LoraConfig(r=LORA.rank, lora_alpha=LORA.alpha, target_modules=list(LORA.target_modules), layers_to_transform=layers, layers_pattern="layers"),
    )
    result = set_peft_model_state_dict(peft_model, adapter)
    assert not result.unexpected_keys
    return peft_model.eval()


def reference_loss(logits_s, logits_t, hidden_s, hidden_t, mask, *, temperature=2.0, alpha=1.0, beta=1.0):
    """The ODA loss from whole [B, T, V] logits, with torch's own kl_div (the definition)."""
    valid = mask.bool()
    n = int(valid.sum())
    zs, zt = logits_s[valid].float() / temperature, logits_t[valid].float() / temperature
    kl = torch.nn.functional.kl_div(zs.log_softmax(-1), zt.log_softmax(-1), log_target=True, reduction="sum") / n * temperature**2
    terms = [((hs[valid].float() - ht[valid].float()).pow(2).sum(-1) / ht[valid].float().pow(2).sum(-1)).mean() for hs, ht in zip(hidden_s, hidden_t)]
    hidden = torch.stack(terms).mean()
    return alpha * kl + beta * hidden, kl, hidden


@pytest.mark.parametrize("chunk", [1, 3, 1024])
def test_loss_is_fp32_masked_chunked_and_zero_on_identity(chunk):
    torch.manual_seed(0)
    head_s, head_t = torch.nn.Linear(4, 11, bias=False), torch.nn.Linear(4, 11, bias=False)
    final_s = torch.randn(2, 5, 4, dtype=torch.bfloat16, requires_grad=True)
    final_t = torch.randn(2, 5, 4, dtype=torch.bfloat16)
    hidden_t = [torch.randn(2, 5, 4, dtype=torch.bfloat16)]
    hidden_s = [torch.randn(2, 5, 4, dtype=torch.bfloat16)]
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    s_logits, t_logits = (lambda h: head_s(h.float())), (lambda h: head_t(h.float()))
    kwargs = dict(temperature=2.0, alpha=0.5, beta=3.0)
    total, kl, hidden = distillation_loss(final_s, final_t, s_logits, t_logits, hidden_s, hidden_t, mask, kl_chunk_tokens=chunk, **kwargs)
    assert total.dtype == kl.dtype == hidden.dtype == torch.float32
    ref_total, ref_kl, ref_hidden = reference_loss(head_s(final_s.float()), head_t(final_t.float()), hidden_s, hidden_t, mask, **kwargs)
    torch.testing.assert_close(kl, ref_kl)
    torch.testing.assert_close(hidden, ref_hidden)
    torch.testing.assert_close(total, ref_total)
    # The gradient through the chunks (each recomputed in backward) equals the whole-logits one.
    (grad,) = torch.autograd.grad(total, final_s)
    (ref_grad,) = torch.autograd.grad(ref_total, final_s)
    torch.testing.assert_close(grad, ref_grad)
    # Whatever sits at padded positions does not matter.
    noisy_s = final_s.detach().clone()
    noisy_s[1, 2:] = 100
    noisy_h = [hidden_s[0].clone()]
    noisy_h[0][1, 2:] = -50
    total2, _, _ = distillation_loss(noisy_s, final_t, s_logits, t_logits, noisy_h, hidden_t, mask, kl_chunk_tokens=chunk, **kwargs)
    torch.testing.assert_close(total.detach(), total2)
    zero, _, _ = distillation_loss(final_t, final_t, t_logits, t_logits, hidden_t, hidden_t, mask, kl_chunk_tokens=chunk)
    assert float(zero) == pytest.approx(0.0, abs=1e-6)


def test_distill_lowers_the_loss_and_trains_only_bridge_layers(smol, batches):
    teacher, _ = smol
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = build_submodel(teacher, KEPT)
    before = layer_states(student)
    embed_before = student.get_input_embeddings().weight.clone()
    config = ODAConfig(steps=12, learning_rate=1e-3)
    loss_before = evaluate_distillation_loss(teacher, student, KEPT, batches, config)
    stats = distill(teacher, student, KEPT, batches, config)
    loss_after = evaluate_distillation_loss(teacher, student, KEPT, batches, config)
    assert stats.steps == 12 and stats.trainable_layers == (1,)
    assert loss_after < 0.8 * loss_before, (loss_before, loss_after)
    after = layer_states(student)
    assert same(before[0], after[0]) and same(before[2], after[2])
    assert not same(before[1], after[1])
    assert torch.equal(embed_before, student.get_input_embeddings().weight)
    assert all(torch.equal(teacher_before[k], v) for k, v in teacher.state_dict().items())
    # Parameters come back frozen as they were, with no gradient left behind.
    assert all(p.requires_grad and p.grad is None for p in student.parameters())


def test_align_all_trains_every_layer(smol, batches):
    teacher, _ = smol
    student = build_submodel(teacher, KEPT)
    before = layer_states(student)
    stats = distill(teacher, student, KEPT, batches[:1], ODAConfig(steps=1, learning_rate=1e-3, align_layers="all"))
    assert stats.trainable_layers == (0, 1, 2)
    assert not any(same(b, a) for b, a in zip(before, layer_states(student)))
    assert trainable_layer_indices([0, 1, 4, 5, 9], "bridge") == [2, 4]


def test_plugged_adapter_equals_peft_and_restores_weights(smol, batches):
    model, _ = smol
    adapter = random_adapter(model, [0, 2])
    reference = peft_with(model, adapter, [0, 2])
    original = {k: v.clone() for k, v in model.state_dict().items()}
    ids = batches[0]["input_ids"]
    mask = batches[0]["attention_mask"]
    with torch.no_grad():
        want = reference(input_ids=ids, attention_mask=mask).logits
        with plugged_adapter(model, adapter, LORA) as changed:
            got = model(input_ids=ids, attention_mask=mask).logits
    assert sorted(changed) == sorted(f"model.layers.{i}.self_attn.{m}" for i in (0, 2) for m in ("q_proj", "v_proj"))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert all(torch.equal(original[k], v) for k, v in model.state_dict().items())


def test_plugged_adapter_on_gpt2_conv1d_equals_peft():
    """GPT-2 stores Conv1D weights transposed; square ones (c_proj) must still get B @ A the right way round."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    from tests.coordinator.arch_models import VOCAB, tiny_model

    lora = LoraSettings(rank=2, alpha=4.0, dropout=0.0, target_modules=("c_attn", "c_proj"))
    model = tiny_model("gpt2", num_layers=2)
    torch.manual_seed(0)
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=2, lora_alpha=4.0, target_modules=["c_attn", "c_proj"]))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn_like(param) * 0.1)
    adapter = get_peft_model_state_dict(peft_model)
    ids = torch.randint(0, VOCAB, (1, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = peft_model.eval()(input_ids=ids).logits
        with plugged_adapter(model, adapter, lora):
            got = model(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_realignment_plugs_the_adapter_into_teacher_and_student(smol, batches):
    teacher, _ = smol
    student = build_submodel(teacher, KEPT)
    full_layers = [0, 1, 2, 3]
    adapter = random_adapter(teacher, full_layers, seed=3)
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    before = layer_states(student)
    config = ODAConfig(steps=3, learning_rate=1e-3)

    # Reference first-step loss: PEFT-wrapped teacher (full indices) and student (sub indices).
    sub_adapter = to_sub_keys(adapter, KEPT, "model.layers")
    peft_teacher = peft_with(teacher, adapter, full_layers)
    peft_student = peft_with(student, sub_adapter, [0, 1, 2])
    batch = batches[0]
    with torch.no_grad(), capture_layer_io(peft_teacher, KEPT) as t_out, capture_layer_io(peft_student) as s_out:
        t_logits = peft_teacher(**batch).logits
        s_logits = peft_student(**batch).logits
        want, _, _ = reference_loss(
            s_logits, t_logits, [s_out[i] for i in range(3)], [t_out[k] for k in KEPT], batch["attention_mask"],
            temperature=config.temperature,
        )

    stats = distill(teacher, student, KEPT, batches, config, global_adapter=adapter, lora=LORA)
    assert stats.first_loss == pytest.approx(float(want), rel=1e-4)
    plain_first = distill(teacher, build_submodel(teacher, KEPT), KEPT, batches, ODAConfig(steps=1)).first_loss
    assert abs(plain_first - stats.first_loss) > 1e-3, "the adapter made no difference to the loss"
    # The teacher is back bit for bit; frozen student layers too (their package chunks stay).
    assert all(torch.equal(teacher_before[k], v) for k, v in teacher.state_dict().items())
    after = layer_states(student)
    assert same(before[0], after[0]) and same(before[2], after[2])
    assert not same(before[1], after[1])


def test_config_validation(smol, batches):
    with pytest.raises(ConfigError):
        ODAConfig(temperature=0)
    with pytest.raises(ConfigError):
        ODAConfig(align_layers="some")  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        ODAConfig(alpha=0, beta=0)
    teacher, _ = smol
    student = build_submodel(teacher, KEPT)
    with pytest.raises(ConfigError, match="LoRA settings"):
        distill(teacher, student, KEPT, batches, ODAConfig(steps=1), global_adapter={})
    with pytest.raises(ConfigError):
        distill(teacher, student, KEPT, [], ODAConfig(steps=1))


def random_batches(n: int = 2, vocab: int = VOCAB) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(5)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (4, 24), generator=gen)
        mask = torch.ones_like(ids)
        mask[0, 20:] = 0
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


TINY_KEPT = [0, 2, 3, 5]  # of the 6-layer tiny model: bridges at sub-LLM layers 1 and 3


def test_gradient_checkpointing_changes_memory_not_results():
    teacher = tiny_model("llama")
    batches = random_batches()
    runs = {}
    for checkpointing in (False, True):
        student = build_submodel(teacher, TINY_KEPT)
        config = ODAConfig(steps=3, learning_rate=1e-3, gradient_checkpointing=checkpointing, kl_chunk_tokens=16)
        runs[checkpointing] = (distill(teacher, student, TINY_KEPT, batches, config).loss, layer_states(student))
        assert not student.is_activation_checkpointing  # switched off again afterwards
    assert runs[True][0] == pytest.approx(runs[False][0], rel=1e-5)
    for a, b in zip(runs[True][1], runs[False][1]):
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6)


def test_a_bf16_student_learns_through_fp32_master_weights():
    """A bf16 model (a GPU coordinator's default) is trained in fp32 and rounded back: steps
    too small for bf16's 8-bit mantissa still accumulate, and the parameters stay bf16."""
    teacher16 = tiny_model("llama").to(torch.bfloat16)
    batches = random_batches()
    student = build_submodel(teacher16, TINY_KEPT)
    before = layer_states(student)
    config = ODAConfig(steps=8, learning_rate=3e-3)
    loss_before = evaluate_distillation_loss(teacher16, student, TINY_KEPT, batches, config)
    stats = distill(teacher16, student, TINY_KEPT, batches, config)
    loss_after = evaluate_distillation_loss(teacher16, student, TINY_KEPT, batches, config)
    assert {p.dtype for p in student.parameters()} == {torch.bfloat16}
    assert loss_after < loss_before and stats.steps == 8
    after = layer_states(student)
    assert same(before[0], after[0]) and not same(before[1], after[1])
    # Steps this small are below bf16's resolution for most weights: without masters almost
    # nothing would move; with them the updates add up until they round to a new value.
    tiny = build_submodel(teacher16, TINY_KEPT)
    bridge_before = layer_states(tiny)[1]
    distill(teacher16, tiny, TINY_KEPT, batches, ODAConfig(steps=12, learning_rate=1e-5, max_grad_norm=0))
    bridge_after = layer_states(tiny)[1]
    moved = sum(int((bridge_before[k] != bridge_after[k]).sum()) for k in bridge_before)
    total = sum(v.numel() for v in bridge_before.values())
    assert moved > 0.4 * total, f"only {moved} of {total} bf16 weights moved"


def test_build_submodel_never_copies_a_dropped_layer(smol):
    teacher, _ = smol
    _, layers = find_decoder_layers(teacher)

    class Refuse:
        def __deepcopy__(self, memo):
            raise AssertionError("a dropped layer was deep-copied")

    layers[1].refuse = Refuse()  # layer 1 is dropped by KEPT
    try:
        sub = build_submodel(teacher, KEPT)
        with pytest.raises(AssertionError, match="dropped layer"):
            build_submodel(teacher, [0, 1, 3])
    finally:
        del layers[1].refuse
    assert len(find_decoder_layers(sub)[1]) == 3
