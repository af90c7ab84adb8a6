"""The LM head a chunk of tokens at a time: the same logits, KL and NLL as the model's own forward."""

from __future__ import annotations

import pytest
import torch

from coordinator.model.evaluation import batches_nll
from coordinator.model.lm_head import TokenLogits, chunked_kl, chunked_nll, final_hidden
from tests.coordinator.arch_models import ARCHS, VOCAB, tiny_model

EXTRA = ("cohere", "granite")  # architectures whose forward scales the logits after the head


def extra_model(arch: str):
    from transformers import AutoModelForCausalLM, CohereConfig, GraniteConfig

    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    config = CohereConfig(logit_scale=0.25, **common) if arch == "cohere" else GraniteConfig(logits_scaling=4.0, **common)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def batch():
    torch.manual_seed(1)
    ids = torch.randint(0, VOCAB, (2, 7))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    return ids, mask


@pytest.mark.parametrize("arch", ARCHS + EXTRA)
def test_head_on_final_hidden_equals_the_forward_logits(arch):
    model = extra_model(arch) if arch in EXTRA else tiny_model(arch)
    ids, mask = batch()
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
        hidden = final_hidden(model, ids, mask)
        got = TokenLogits(model)(hidden.reshape(-1, hidden.shape[-1])).reshape(want.shape)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_chunked_kl_and_nll_equal_the_whole_tensor_results():
    model = tiny_model("llama")
    head = TokenLogits(model)
    torch.manual_seed(2)
    hs = torch.randn(10, 32, requires_grad=True)
    ht = torch.randn(10, 32)
    whole = chunked_kl(hs, ht, head, head, temperature=2.0, chunk=10)
    for chunk in (1, 3, 4):
        torch.testing.assert_close(chunked_kl(hs, ht, head, head, temperature=2.0, chunk=chunk), whole)
    zs, zt = head(hs) / 2, head(ht) / 2
    ref = torch.nn.functional.kl_div(zs.log_softmax(-1), zt.log_softmax(-1), log_target=True, reduction="sum") / 10 * 4
    torch.testing.assert_close(whole, ref)
    targets = torch.randint(0, VOCAB, (10,))
    ref_nll = torch.nn.functional.cross_entropy(head(ht), targets, reduction="sum")
    torch.testing.assert_close(chunked_nll(ht, targets, head, chunk=3), ref_nll)


def test_perplexity_never_builds_the_whole_logits_tensor():
    """batches_nll equals the forward's cross-entropy, and the head never sees more than a chunk."""
    model = tiny_model("qwen2")
    ids, mask = batch()
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1]
    valid = (mask[:, 1:] * mask[:, :-1]).bool()
    want = float(torch.nn.functional.cross_entropy(logits[valid], ids[:, 1:][valid], reduction="sum"))
    seen: list[int] = []
    head = model.get_output_embeddings()
    head.register_forward_hook(lambda _m, args, _out: seen.append(args[0].shape[0]))
    total, count = batches_nll(model, [{"input_ids": ids, "attention_mask": mask}], chunk_tokens=4)
    assert total == pytest.approx(want, rel=1e-5) and count == int(valid.sum())
    assert seen and max(seen) <= 4
