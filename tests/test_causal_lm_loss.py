"""The blockwise causal-LM loss: transformers' ForCausalLMLoss's value and gradient (against
a float64 reference) in float32 and bf16, over several blocks, with ignored labels,
``num_items_in_batch`` and ``shift_labels``; it saves no float32 copy of bf16 logits for the
backward; the pipeline's Hugging Face models use it unless ``model.blockwise_loss=false``."""
import pytest
import torch
import transformers
from transformers.loss.loss_utils import ForCausalLMLoss

from gradprobe_dist.models import causal_lm_loss as module
from gradprobe_dist.models.causal_lm_loss import causal_lm_loss, use_causal_lm_loss

V = 300


def _case(dtype):
    g = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(2, 17, V, generator=g)).to(dtype)
    labels = torch.randint(0, V, (2, 17), generator=g)
    labels[0, 4] = labels[1, 9] = -100
    return logits, labels


def _loss_and_grad(fn, logits, **kwargs):
    x = logits.detach().clone().requires_grad_()
    loss = fn(x, **kwargs)
    loss.backward()
    return loss.detach(), x.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("extra", ["mean", "num_items", "shift_labels"])
def test_value_and_gradient_are_transformers_up_to_rounding(monkeypatch, dtype, extra):
    monkeypatch.setattr(module, "BLOCK_ELEMENTS", 5 * V)  # 5 rows a block: 7 blocks, the last short
    logits, labels = _case(dtype)
    kwargs = {"labels": labels, "vocab_size": V}
    if extra == "num_items":
        kwargs["num_items_in_batch"] = torch.tensor(50)
    if extra == "shift_labels":
        kwargs["shift_labels"] = torch.roll(labels, 3, dims=1)
    ref_loss, ref_grad = _loss_and_grad(ForCausalLMLoss, logits.double(), **kwargs)
    theirs, their_grad = _loss_and_grad(ForCausalLMLoss, logits, **kwargs)
    ours, our_grad = _loss_and_grad(causal_lm_loss, logits, **kwargs)
    assert our_grad.dtype == dtype and ours.dtype == torch.float32
    assert abs(float(ours) - float(ref_loss)) <= 1e-6 * float(ref_loss)
    err = lambda g: float((g.double() - ref_grad).norm() / ref_grad.norm())  # noqa: E731
    assert err(our_grad) <= max(2 * err(their_grad), 1e-6)  # bf16: the cast of the gradient itself
    targets = kwargs.get("shift_labels", torch.cat([labels[:, 1:], torch.full((2, 1), -100)], dim=1))
    ignored = targets == -100  # each position's target; the last predicts nothing
    assert ignored.sum() >= 2 and torch.all(our_grad[ignored] == 0) and torch.all(our_grad[~ignored].abs().sum(-1) > 0)


def test_bf16_logits_get_no_float32_copy_saved_for_the_backward():
    logits, labels = _case(torch.bfloat16)
    logits.requires_grad_()
    saved = {}
    for name, fn in (("ours", causal_lm_loss), ("transformers", ForCausalLMLoss)):
        sizes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel() * t.element_size()) or t,
                                                      lambda t: t):
            fn(logits, labels=labels, vocab_size=V)
        saved[name] = sum(sizes)
    assert saved["ours"] < logits.numel() * 2 + 1024  # the logits themselves, plus per-token numbers
    assert saved["transformers"] >= logits.numel() * 4  # a float32 log-softmax of every logit


def _tiny_llama():
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(
        vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32))


def test_a_llama_computes_the_same_loss_with_it_and_other_losses_are_left_alone():
    model = _tiny_llama()
    ids = torch.randint(0, V, (2, 16), generator=torch.Generator().manual_seed(1))
    before = model(input_ids=ids, labels=ids).loss
    assert use_causal_lm_loss(model) and model.loss_function is causal_lm_loss
    torch.testing.assert_close(model(input_ids=ids, labels=ids).loss, before)
    other = _tiny_llama()
    other.loss_function = own = lambda logits, labels, vocab_size, **kw: logits.sum()  # noqa: E731
    assert not use_causal_lm_loss(other) and other.loss_function is own


@pytest.mark.parametrize("blockwise", [True, False])
def test_the_pipeline_builds_hf_models_with_it_unless_turned_off(tmp_path, blockwise):
    from gradprobe_dist.pipeline.build import build_model
    from gradprobe_dist.pipeline.config import ModelConfig

    _tiny_llama().save_pretrained(tmp_path)
    model = build_model(ModelConfig(kind="hf", path=str(tmp_path), blockwise_loss=blockwise))
    assert (model.loss_function is causal_lm_loss) == blockwise
