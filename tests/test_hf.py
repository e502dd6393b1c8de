"""transformers integration: fastgpt.patch on GPT-2, GPT.from_hf, and the "fastgpt" AttentionInterface.

Every model is randomly initialised from a small config; nothing downloads. Parity uses the
project's rule (tests/tolerance.py): the float64 transformers model is the reference, and the
float32 transformers model sets the error budget.
"""

import copy
import inspect
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tolerance import ABSOLUTE_SLACK, assert_close, max_error, rounding_floor

import fastgpt
from fastgpt.nn import GPT, GPTConfig

transformers = pytest.importorskip("transformers")
from transformers import GPT2Config, GPT2LMHeadModel, GPT2Model, LlamaConfig, LlamaForCausalLM
from transformers.models.gpt2.modeling_gpt2 import GPT2MLP

from fastgpt.integrations import transformers as integration
from fastgpt.nn.weights import CheckpointError

VOCAB = 97


def gpt2_config(**overrides):
    fields = {
        "n_layer": 2,
        "n_embd": 64,
        "n_head": 4,
        "vocab_size": VOCAB,
        "n_positions": 64,
        "bos_token_id": None,
        "eos_token_id": None,
    }
    return GPT2Config(**{**fields, **overrides})


def random_gpt2(model_class=GPT2LMHeadModel, **overrides):
    model = model_class(gpt2_config(**overrides)).eval()
    model.loss_type = "ForCausalLM"  # transformers warns (a graph break under compile) when it is unset
    with torch.no_grad():  # LayerNorm and biases start at 1 and 0; random values exercise them
        for name, parameter in model.named_parameters():
            if "ln_" in name or name.endswith("bias"):
                parameter.add_(0.1 * torch.randn_like(parameter))
    return model


@pytest.fixture
def attention_calls(monkeypatch):
    """Counts the calls of fastgpt.causal_attention and of the SDPA fallback made by the interface."""
    calls = {"fastgpt": 0, "sdpa": 0}
    fast, sdpa = integration.causal_attention, integration._sdpa_attention()

    def counted_fast(*args, **kwargs):
        calls["fastgpt"] += 1
        return fast(*args, **kwargs)

    def counted_sdpa(*args, **kwargs):
        calls["sdpa"] += 1
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(integration, "causal_attention", counted_fast)
    monkeypatch.setattr(integration, "_sdpa_attention", lambda: counted_sdpa)
    return calls


def token_losses(logits, labels, shift_labels=None):
    """transformers' causal-LM loss per predicted token, in at least float32 (0 where the label is -100):
    logits (B, T, V), labels (B, T) shifted by one unless shift_labels (B, T) is given. Returns (B, T')."""
    if shift_labels is None:
        logits, shift_labels = logits[:, :-1], labels[:, 1:]
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(logits.transpose(1, 2), shift_labels.to(logits.device), reduction="none")


def assert_loss_close(loss, reference, eager_logits, reference_logits, labels, kwargs):
    """A causal-LM loss (the sum of per-token losses over a divisor: the kept tokens, or
    num_items_in_batch) against the float64 model's, under the 2x rule applied per token: its error is
    at most kept / divisor times the largest per-token error, which the rule bounds by twice the
    unpatched model's (its logits through transformers' loss) plus the float32 floor. The rule on the
    one scalar would compare two rounding noises: in bfloat16 a correct loss failed it for 1 of 8 seeds."""
    shift_labels = kwargs.get("shift_labels")
    eager_tokens = token_losses(eager_logits, labels, shift_labels)
    reference_tokens = token_losses(reference_logits, labels, shift_labels)
    targets = labels[:, 1:] if shift_labels is None else shift_labels
    kept = int(targets.ne(-100).sum())
    divisor = float(kwargs.get("num_items_in_batch", kept))
    per_token = (
        2.0 * max_error(eager_tokens, reference_tokens)
        + rounding_floor(reference_tokens, torch.float32)
        + ABSOLUTE_SLACK[torch.float32]
    )
    error = max_error(loss, reference)
    assert error <= kept / divisor * per_token, (
        f"loss: error {error:.3e} exceeds {kept} / {divisor:g} of twice the unpatched model's largest "
        f"per-token error + floor ({per_token:.3e})"
    )


def run_patched_eager_reference(hf, dtype, idx, labels, kwargs):
    """fastgpt.patch of `hf` in `dtype`, the unpatched model in `dtype` (the error budget) and the float64
    model, each called on idx with labels and kwargs, its loss backpropagated: {name: (model, output)}."""
    models = {
        "patched": fastgpt.patch(copy.deepcopy(hf).to(dtype)),
        "eager": copy.deepcopy(hf).to(dtype),
        "reference": copy.deepcopy(hf).double(),
    }
    runs = {}
    for name, model in models.items():
        out = model(idx, labels=labels, **kwargs)
        out.loss.backward()
        runs[name] = (model, out)
    return runs


def assert_loss_and_gradients_close(runs, labels, kwargs):
    """The patched run's loss (assert_loss_close) and every parameter's gradient (the 2x rule) against the
    float64 run's, with the unpatched run's errors as the budget."""
    (patched, mine), (eager, eager_out), (hf64, reference) = (
        runs[name] for name in ("patched", "eager", "reference")
    )
    assert_loss_close(
        mine.loss.detach(),
        reference.loss.detach(),
        eager_out.logits.detach(),
        reference.logits.detach(),
        labels,
        kwargs,
    )
    eager_parameters = dict(eager.named_parameters())
    patched_parameters = dict(patched.named_parameters())
    for name, parameter in hf64.named_parameters():
        assert_close(
            f"grad {name}", patched_parameters[name].grad, parameter.grad, eager_parameters[name].grad
        )


def assert_patch_matches_unpatched(hf, dtype, idx, attention_calls):
    """fastgpt.patch of `hf` in `dtype` against the float64 model on the same tokens: logits and every
    gradient under the 2x rule, the loss under it per token (assert_loss_close), with the unpatched
    model in `dtype` as the error budget, and both layers' attention run by fastgpt."""
    runs = run_patched_eager_reference(hf, dtype, idx, idx, {})
    assert attention_calls == {"fastgpt": 2, "sdpa": 0}  # both layers ran on fastgpt
    mine, eager, reference = (runs[name][1].logits.detach() for name in ("patched", "eager", "reference"))
    assert_close("logits", mine, reference, eager)
    assert_loss_and_gradients_close(runs, idx, {})


def test_patch_matches_unpatched_logits_loss_and_gradients(attention_calls):
    hf = random_gpt2()
    idx = torch.randint(0, VOCAB, (3, 33))
    assert_patch_matches_unpatched(hf, torch.float32, idx, attention_calls)


@pytest.mark.gpu
def test_gpu_patched_gpt2_matches_unpatched_in_bfloat16(attention_calls):
    """fastgpt.patch as a user applies it on a GPU: a bfloat16 GPT-2 on CUDA (head_dim 64, which every
    fastgpt GPU backend serves), logits, loss and every gradient against the float64 model, within twice
    the bfloat16 transformers model's error."""
    hf = random_gpt2(n_embd=128, n_head=2, n_positions=256).cuda()
    idx = torch.randint(0, VOCAB, (4, 200), device="cuda")
    assert_patch_matches_unpatched(hf, torch.bfloat16, idx, attention_calls)


def test_padding_mask_is_routed_to_sdpa(attention_calls):
    hf = random_gpt2()
    patched = fastgpt.patch(copy.deepcopy(hf))
    idx = torch.randint(0, VOCAB, (3, 20))
    mask = torch.ones(3, 20, dtype=torch.long)
    mask[0, :6] = 0  # left padding
    mask[2, :2] = 0
    expected = hf(idx, attention_mask=mask).logits
    got = patched(idx, attention_mask=mask).logits
    assert attention_calls == {"fastgpt": 0, "sdpa": 2}
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], rtol=0, atol=1e-6)
    unpadded = hf(idx[1:2]).logits  # a row without padding gives what an unpadded call gives
    torch.testing.assert_close(got[1:2], unpadded, rtol=0, atol=1e-5)


def test_training_mode_dropout_matches_unpatched(attention_calls):
    hf = random_gpt2(attn_pdrop=0.2, resid_pdrop=0.1, embd_pdrop=0.1).train()
    patched = fastgpt.patch(copy.deepcopy(hf), loss=False)  # the fused loss would leave logits None
    idx = torch.randint(0, VOCAB, (2, 16))
    torch.manual_seed(7)
    expected = hf(idx, labels=idx)
    torch.manual_seed(7)
    got = patched(idx, labels=idx)
    assert attention_calls == {"fastgpt": 0, "sdpa": 2}  # attention dropout runs where transformers runs it
    torch.testing.assert_close(got.logits, expected.logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(got.loss, expected.loss, rtol=0, atol=1e-6)
    assert (got.logits - hf.eval()(idx).logits).abs().max() > 1e-2  # dropout was active


def assert_fused_loss_matches(hf, dtype, idx, labels, kwargs):
    """fastgpt.patch's fused loss (`hf` in training mode) in `dtype` against the float64 model: the loss
    (assert_loss_close) and every parameter's gradient under the 2x rule, with the unpatched model in
    `dtype` as the error budget, and no logits formed."""
    runs = run_patched_eager_reference(hf, dtype, idx, labels, kwargs)
    mine, eager = runs["patched"][1], runs["eager"][1]
    assert mine.logits is None and eager.logits is not None
    assert mine.loss.dtype == torch.float32
    assert_loss_and_gradients_close(runs, labels, kwargs)


@pytest.mark.parametrize("labels_form", ["labels", "ignored labels", "num_items_in_batch", "shift_labels"])
def test_fused_loss_matches_transformers_loss_and_gradients(labels_form):
    """In training mode the patched loss is linear_cross_entropy on the hidden states: transformers'
    loss (its label shift, ignore_index, num_items_in_batch and shift_labels) and every parameter's
    gradient, with no logits formed."""
    hf = random_gpt2(attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0).train()
    idx = torch.randint(0, VOCAB, (3, 20))
    labels = idx.clone()
    kwargs = {}
    if labels_form == "ignored labels":
        labels[0, :5] = -100
        labels[2, 7] = -100
    elif labels_form == "num_items_in_batch":
        kwargs["num_items_in_batch"] = torch.tensor(40)
    elif labels_form == "shift_labels":
        kwargs["shift_labels"] = torch.randint(0, VOCAB, (3, 20))
    assert_fused_loss_matches(hf, torch.float32, idx, labels, kwargs)


@pytest.mark.gpu
def test_gpu_patched_gpt2_fused_loss_in_bfloat16():
    """The fused loss as a user trains with it on a GPU: a bfloat16 GPT-2 on CUDA in training mode, so
    linear_cross_entropy runs a CUDA backend on a strided view of the hidden states and the tied LM
    head (a vocabulary that is no multiple of 64), with ignored labels and the Trainer's
    num_items_in_batch as a one-element CPU tensor (transformers' loss moves it to the loss's device)."""
    hf = random_gpt2(n_embd=128, n_head=2, n_positions=256, attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)
    hf = hf.cuda().train()
    idx = torch.randint(0, VOCAB, (4, 200), device="cuda")
    labels = idx.clone()
    labels[0, :50] = -100
    labels[2, 99] = -100
    kwargs = {"num_items_in_batch": labels[:, 1:].ne(-100).sum().cpu().reshape(1)}
    assert_fused_loss_matches(hf, torch.bfloat16, idx, labels, kwargs)


@pytest.mark.gpu
def test_gpu_patched_gpt2_under_autocast_with_cpu_labels_keeps_transformers_loss(attention_calls):
    """Under CUDA autocast the patched model's loss is transformers' (logits formed, the patched MLP
    and LayerNorm on their original forwards), also when the labels are on the CPU: whether autocast
    is on is read for the model's device, not the labels'. Logits and loss against the float64 model,
    with the unpatched model under the same autocast as the error budget."""
    hf = random_gpt2(n_embd=128, n_head=2, n_positions=256, attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)
    hf = hf.cuda().train()
    hf64 = copy.deepcopy(hf).double()
    patched = fastgpt.patch(copy.deepcopy(hf))
    idx = torch.randint(0, VOCAB, (2, 64), device="cuda")
    labels = idx.cpu()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got = patched(idx, labels=labels)
        eager = hf(idx, labels=labels)
    reference = hf64(idx, labels=labels)
    assert got.logits is not None
    assert attention_calls == {"fastgpt": 2, "sdpa": 0}  # attention still runs on fastgpt, in bfloat16
    assert_close("logits", got.logits.detach(), reference.logits.detach(), eager.logits.detach())
    assert_loss_close(
        got.loss.detach(),
        reference.loss.detach(),
        eager.logits.detach(),
        reference.logits.detach(),
        labels,
        {},
    )


def test_gradient_checkpointing_matches_plain_training(attention_calls):
    """transformers' gradient checkpointing recomputes each GPT2Block in the backward through the
    patched forwards: the same fused loss and gradients as without it, attention on fastgpt both times."""
    hf = random_gpt2(attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0).train()
    plain = fastgpt.patch(copy.deepcopy(hf))
    checkpointed = fastgpt.patch(copy.deepcopy(hf))
    # transformers 5.25 renamed gradient_checkpointing_enable (now a deprecated alias); 5.17 has only it
    enable = getattr(
        checkpointed, "activation_checkpointing_enable", checkpointed.gradient_checkpointing_enable
    )
    enable({"use_reentrant": False})
    idx = torch.randint(0, VOCAB, (2, 16))
    losses = [model(idx, labels=idx).loss for model in (plain, checkpointed)]
    for loss in losses:
        loss.backward()
    assert attention_calls == {"fastgpt": 2 + 2 * 2, "sdpa": 0}  # plain; checkpointed: forward and recompute
    torch.testing.assert_close(losses[1], losses[0], rtol=0, atol=0)
    for (name, parameter), checkpointed_parameter in zip(plain.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(checkpointed_parameter.grad, parameter.grad, rtol=0, atol=1e-6, msg=name)


class RightPaddingTokenizer:
    """What DataCollatorForLanguageModeling asks of a tokenizer: right padding with id 0."""

    pad_token_id = 0
    padding_side = "right"

    def pad(self, features, return_tensors="pt", **kwargs):
        length = max(len(f["input_ids"]) for f in features)
        ids = torch.zeros(len(features), length, dtype=torch.long)  # (B, T)
        mask = torch.zeros_like(ids)
        for row, feature in enumerate(features):
            ids[row, : len(feature["input_ids"])] = torch.tensor(feature["input_ids"])
            mask[row, : len(feature["input_ids"])] = 1
        return {"input_ids": ids, "attention_mask": mask}


def trainer_losses(model, dataset, output_dir):
    """The loss logged at each of 6 steps of transformers' Trainer on dataset, right-padded batches of 8."""
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainerCallback, TrainingArguments

    losses = []

    class LossLog(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                losses.append(logs["loss"])

    arguments = TrainingArguments(
        output_dir=output_dir, max_steps=6, per_device_train_batch_size=8, learning_rate=1e-3, logging_steps=1,
        report_to=[], use_cpu=True, seed=0, save_strategy="no", disable_tqdm=True,
    )  # fmt: skip
    collator = DataCollatorForLanguageModeling(RightPaddingTokenizer(), mlm=False)
    trainer = Trainer(
        model=model, args=arguments, train_dataset=dataset, data_collator=collator, callbacks=[LossLog()]
    )
    trainer.train()
    return losses


def test_patched_gpt2_trains_in_transformers_trainer_as_unpatched(tmp_path, attention_calls):
    """transformers' Trainer fine-tunes a patched model step for step as the unpatched one: dataset columns
    chosen by forward's signature, labels from the language-modelling collator (-100 on the padding),
    num_items_in_batch, the fused loss. The right-padded batches' masks keep the attention on SDPA."""
    pytest.importorskip("accelerate")  # the Trainer needs it
    hf = random_gpt2().train()
    generator = torch.Generator().manual_seed(1)
    lengths = torch.randint(8, 40, (48,), generator=generator).tolist()
    dataset = [{"input_ids": torch.randint(1, VOCAB, (n,), generator=generator).tolist()} for n in lengths]
    expected = trainer_losses(copy.deepcopy(hf), dataset, tmp_path / "unpatched")
    sdpa_calls = attention_calls["sdpa"]
    got = trainer_losses(fastgpt.patch(copy.deepcopy(hf)), dataset, tmp_path / "patched")
    assert len(got) == len(expected) == 6
    torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), rtol=1e-5, atol=0)
    assert attention_calls["sdpa"] > sdpa_calls  # the padded batches' attention


def test_fused_loss_leaves_other_calls_to_transformers():
    hf = random_gpt2(attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)
    patched = fastgpt.patch(copy.deepcopy(hf))
    idx = torch.randint(0, VOCAB, (2, 12))
    evaluated = patched(idx, labels=idx)  # eval mode: logits wanted
    torch.testing.assert_close(evaluated.logits, hf(idx).logits, rtol=0, atol=1e-5)
    patched.train()
    assert patched(idx).logits is not None  # no labels: no loss to fuse
    as_tuple = patched(idx, labels=idx, return_dict=False)
    assert isinstance(as_tuple, tuple) and as_tuple[1].shape == (2, 12, VOCAB)
    # logits_to_keep as the positions to keep (a tensor; here all of them, so the labels line up)
    kept = patched(idx, labels=idx, logits_to_keep=torch.arange(12))
    torch.testing.assert_close(kept.logits, hf.train()(idx).logits, rtol=0, atol=1e-5)


def test_patch_keeps_parameters_and_checkpoints(tmp_path):
    model = random_gpt2()
    before = {name: parameter for name, parameter in model.named_parameters()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    assert fastgpt.patch(model, backend="reference") is model
    for name, parameter in model.named_parameters():
        assert parameter is before[name], name
    assert model.transformer.h[0].attn.fastgpt_backend == "reference"
    assert model.transformer.h[0].mlp.fastgpt_backend == "reference"
    idx = torch.randint(0, VOCAB, (2, 12))
    model(idx, labels=idx).loss.backward()
    optimizer.step()  # the optimizer still holds the model's parameters
    assert all(before[name].grad is not None for name in before)
    model.save_pretrained(tmp_path)
    reloaded = GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    assert reloaded.config._attn_implementation == "sdpa"  # nothing of the patch is saved
    torch.testing.assert_close(reloaded(idx).logits, model(idx).logits, rtol=0, atol=1e-5)
    # The whole model pickled (torch.save(model)) loads back patched, each forward bound to its own module.
    torch.save(model, tmp_path / "model.pt")
    unpickled = torch.load(tmp_path / "model.pt", weights_only=False)
    mlp = unpickled.transformer.h[0].mlp
    assert "forward" in vars(mlp) and mlp.forward.args[0] is mlp and unpickled.forward.args[0] is unpickled
    torch.testing.assert_close(unpickled(idx).logits, model(idx).logits, rtol=0, atol=0)


@pytest.mark.parametrize("part", ["attention", "mlp", "layer_norm", "projections", "loss"])
def test_each_part_patches_alone(part, attention_calls):
    hf = random_gpt2()
    flags = {"attention": False, "mlp": False, "layer_norm": False, "projections": False, "loss": False}
    flags[part] = True
    patched = fastgpt.patch(copy.deepcopy(hf), **flags)
    mlp = patched.transformer.h[0].mlp
    assert ("forward" in vars(mlp)) == (part == "mlp")
    assert ("forward" in vars(patched.transformer.ln_f)) == (part == "layer_norm")
    assert ("forward" in vars(patched.transformer.h[0].attn.c_attn)) == (part == "projections")
    assert ("forward" in vars(patched.lm_head)) == (part == "projections")
    assert (patched.config._attn_implementation == "fastgpt") == (part == "attention")
    assert ("forward" in vars(patched)) == (part == "loss")
    idx = torch.randint(0, VOCAB, (2, 12))
    torch.testing.assert_close(patched(idx).logits, hf(idx).logits, rtol=0, atol=1e-5)
    assert attention_calls["fastgpt"] == (2 if part == "attention" else 0)


@pytest.mark.parametrize("batch", [1, 3])
def test_patched_projections_run_decode_rows_on_the_cpu_kernel(batch, monkeypatch, fresh_routes):
    """A decode-sized call (<= 16 rows) of the patched attention projections and LM head runs the cpu
    linear kernel, Conv1D weights included (1 row: the (in, out) kernel; 3: still within its 4 rows),
    and matches the float64 model within the float32 model's error."""
    compiled = pytest.importorskip("fastgpt.ops.compiled", reason="fastgpt._C (the cpu backend) is not built")
    hf = random_gpt2()
    patched = fastgpt.patch(copy.deepcopy(hf), attention=False, mlp=False, layer_norm=False, backend="cpu")
    calls = []
    kernel = compiled.linear
    monkeypatch.setattr(compiled, "linear", lambda *args: calls.append(args) or kernel(*args))
    idx = torch.randint(0, VOCAB, (batch, 1))
    with torch.no_grad():
        logits = patched(idx).logits
        reference = copy.deepcopy(hf).double()(idx).logits
        eager = hf(idx).logits
    assert_close("logits", logits, reference, eager)
    assert len(calls) == 2 * 2 + 1  # c_attn and c_proj of both layers, the LM head


def test_patch_other_heads_and_activations():
    for model_class, field in (
        (GPT2Model, "last_hidden_state"),
        (transformers.GPT2ForSequenceClassification, "logits"),
    ):
        hf = random_gpt2(model_class, activation_function="relu", pad_token_id=0)
        patched = fastgpt.patch(copy.deepcopy(hf))
        mlps = [module for module in patched.modules() if isinstance(module, GPT2MLP)]
        assert len(mlps) == 2 and all(mlp.fastgpt_activation == "relu" for mlp in mlps)
        idx = torch.randint(1, VOCAB, (2, 12))
        torch.testing.assert_close(getattr(patched(idx), field), getattr(hf(idx), field), rtol=0, atol=1e-5)


def test_double_heads_model_keeps_its_forward_and_multiple_choice_loss():
    """GPT2DoubleHeadsModel has an LM head too, but its forward adds a multiple-choice head: the fused
    loss, which stands in for GPT2LMHeadModel.forward, leaves it alone, so in training mode with labels
    and mc_labels the patched model still returns mc_loss and mc_logits, equal to the unpatched model's."""
    hf = random_gpt2(
        transformers.GPT2DoubleHeadsModel,
        attn_pdrop=0.0,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        summary_first_dropout=0.0,
    ).train()
    patched = fastgpt.patch(copy.deepcopy(hf))
    assert "forward" not in vars(patched) and "forward" in vars(patched.lm_head)  # the projection is patched
    idx = torch.randint(0, VOCAB, (2, 3, 10))  # (batch, choices, T)
    kwargs = {"mc_token_ids": torch.full((2, 3), 9), "labels": idx, "mc_labels": torch.tensor([0, 2])}
    got, expected = patched(idx, **kwargs), hf(idx, **kwargs)
    for field in ("loss", "mc_loss", "logits", "mc_logits"):
        torch.testing.assert_close(getattr(got, field), getattr(expected, field), rtol=0, atol=1e-5)


def test_patch_rejects_and_warns():
    with pytest.raises(TypeError, match="model must be a transformers GPT-2 model .*got Linear"):
        fastgpt.patch(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="backend must be one of .*got 'gpu'"):
        fastgpt.patch(random_gpt2(), backend="gpu")
    eager = GPT2LMHeadModel(gpt2_config(attn_implementation="eager"))
    with pytest.warns(UserWarning, match="attention left on 'eager'"):
        fastgpt.patch(eager)
    assert eager.config._attn_implementation == "eager"
    assert "forward" in vars(eager.transformer.h[0].mlp)  # the rest is still patched
    with pytest.warns(UserWarning, match="MLP left unpatched, its activation_function 'quick_gelu'"):
        fastgpt.patch(random_gpt2(activation_function="quick_gelu"))


@pytest.mark.parametrize("cache_implementation", ["dynamic", "static"])
def test_patched_generate_matches_unpatched(cache_implementation, attention_calls):
    """Greedy generation (tokens and every step's logits) equals the unpatched model's. With the default DynamicCache fastgpt runs the
    prefill and every decode step (no mask: one query sees every cached key). A StaticCache hands the
    prefill keys as long as the whole cache with no mask, which SDPA reads as causal from the top left
    (the unfilled tail unseen), so fastgpt attends to the first q_len keys only; its decode steps come
    with a mask, which goes to SDPA."""
    hf = random_gpt2()
    patched = fastgpt.patch(copy.deepcopy(hf))
    prompt = torch.randint(0, VOCAB, (2, 6))
    kwargs = {
        "attention_mask": torch.ones_like(prompt),
        "max_new_tokens": 12,
        "do_sample": False,
        "pad_token_id": 0,
        "cache_implementation": cache_implementation,
        "output_scores": True,
        "return_dict_in_generate": True,
    }
    got, expected = patched.generate(prompt, **kwargs), hf.generate(prompt, **kwargs)
    assert torch.equal(got.sequences, expected.sequences)
    torch.testing.assert_close(torch.stack(got.scores), torch.stack(expected.scores), rtol=0, atol=1e-5)
    if cache_implementation == "dynamic":
        assert attention_calls == {"fastgpt": 2 * 12, "sdpa": 0}  # prefill and decode, cached
    else:
        assert attention_calls == {"fastgpt": 2, "sdpa": 2 * 11}  # the prefill; the decode steps


def lm_head_input_shapes_in_generate(model, prompt, new_tokens):
    """The shape of every input the model's LM head receives during a greedy generate()."""
    shapes = []
    hook = model.lm_head.register_forward_hook(lambda module, inputs, output: shapes.append(inputs[0].shape))
    try:
        model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
        )
    finally:
        hook.remove()
    return shapes


def test_patched_generate_forms_the_logits_of_the_last_position_only():
    """generate() passes logits_to_keep to a forward whose signature names it. The patched forward
    reports GPT2LMHeadModel.forward's signature, so the prefill runs the LM head on one position per
    sequence, as unpatched, instead of on the whole prompt."""
    hf = random_gpt2()
    patched = fastgpt.patch(copy.deepcopy(hf))
    assert inspect.signature(patched.forward) == inspect.signature(hf.forward)
    prompt = torch.randint(0, VOCAB, (2, 6))
    one_position = torch.Size([2, 1, hf.config.n_embd])
    assert lm_head_input_shapes_in_generate(hf, prompt, 3) == [one_position] * 3
    assert lm_head_input_shapes_in_generate(patched, prompt, 3) == [one_position] * 3


def test_patched_forwards_take_their_class_forwards_arguments_by_name():
    """Every patched forward reports its class forward's signature and takes its input by the name that
    signature gives (nn.LayerNorm's and nn.Linear's `input`, Conv1D's `x`, GPT2MLP's `hidden_states`),
    with the patched result."""
    hf = random_gpt2()
    patched = fastgpt.patch(copy.deepcopy(hf), backend="reference")
    block, hf_block = patched.transformer.h[0], hf.transformer.h[0]
    x = torch.randn(2, 5, hf.config.n_embd)
    pairs = [
        (block.ln_1, hf_block.ln_1, x),
        (block.attn.c_attn, hf_block.attn.c_attn, x),
        (block.mlp, hf_block.mlp, x),
        (patched.lm_head, hf.lm_head, x),
    ]
    for module, original, value in pairs:
        signature = inspect.signature(module.forward)
        assert signature == inspect.signature(original.forward), type(module).__name__
        (name,) = signature.parameters
        by_name = module(**{name: value})
        assert torch.equal(by_name, module(value)), type(module).__name__
        torch.testing.assert_close(by_name, original(value), rtol=0, atol=1e-5)


def test_patched_gpt2_compiles_fullgraph():
    """Dynamo captures the patched model in one graph and AOTAutograd traces it (aot_eager: inductor's
    code generation for transformers' own ops is not what this checks)."""
    hf = random_gpt2()
    patched = fastgpt.patch(copy.deepcopy(hf))
    idx = torch.randint(0, VOCAB, (2, 16))
    expected = patched(idx, labels=idx)
    compiled = torch.compile(patched, fullgraph=True, backend="aot_eager")
    got = compiled(idx, labels=idx)
    torch.testing.assert_close(got.logits, expected.logits, rtol=0, atol=1e-6)
    torch.testing.assert_close(got.loss, expected.loss, rtol=0, atol=1e-6)
    got.loss.backward()
    assert all(parameter.grad is not None for parameter in patched.parameters())


# ----------------------------------------------------------------------------------------------
# GPT.from_hf


def check_from_hf(gpt, hf, idx):
    """GPT's logits against the float64 copy of the transformers GPT2LMHeadModel."""
    hf64 = copy.deepcopy(hf).double()
    assert_close("logits", gpt(idx).detach(), hf64(idx).logits.detach(), hf(idx).logits.detach())


def test_from_hf_model_object():
    hf = random_gpt2()
    gpt = GPT.from_hf(hf)
    assert gpt.config.block_size == 64 and gpt.config.n_layer == 2 and gpt.config.dropout == 0.0
    assert gpt.lm_head.weight is gpt.transformer.wte.weight
    # Conv1D (in, out) weights are transposed into Linear's (out, in), and nothing shares storage.
    hf_weight = hf.transformer.h[0].attn.c_attn.weight
    assert torch.equal(gpt.transformer.h[0].attn.c_attn.weight, hf_weight.t())
    assert gpt.transformer.wte.weight.data_ptr() != hf.transformer.wte.weight.data_ptr()
    check_from_hf(gpt, hf, torch.randint(0, VOCAB, (3, 40)))
    assert GPT.from_hf(hf, dropout=0.1, backend="reference").config.backend == "reference"


def test_from_hf_directories(tmp_path):
    hf = random_gpt2(n_inner=96, activation_function="gelu")
    idx = torch.randint(0, VOCAB, (2, 25))
    hf.save_pretrained(tmp_path / "safetensors")
    check_from_hf(GPT.from_hf(tmp_path / "safetensors"), hf, idx)
    # Sharded, as save_pretrained writes a model above max_shard_size (GPT-2 XL in float32 before
    # transformers 5): model.safetensors.index.json and its shard files.
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert len(list((tmp_path / "sharded").glob("model-*.safetensors"))) > 1
    check_from_hf(GPT.from_hf(tmp_path / "sharded"), hf, idx)
    index = tmp_path / "sharded" / "model.safetensors.index.json"
    weight_map = json.loads(index.read_text())
    weight_map["weight_map"]["transformer.h.9.mlp.c_fc.weight"] = next(
        iter(weight_map["weight_map"].values())
    )
    index.write_text(json.dumps(weight_map))
    with pytest.raises(CheckpointError, match=r"maps tensors its shards lack: transformer\.h\.9"):
        GPT.from_hf(tmp_path / "sharded")
    # The same shards as pickles (transformers' format before safetensors): pytorch_model.bin.index.json.
    pickled = tmp_path / "pickled"
    hf.config.save_pretrained(pickled)
    names = list(hf.state_dict())
    halves = {
        "pytorch_model-00001-of-00002.bin": names[: len(names) // 2],
        "pytorch_model-00002-of-00002.bin": names[len(names) // 2 :],
    }
    for shard, shard_names in halves.items():
        torch.save({name: hf.state_dict()[name] for name in shard_names}, pickled / shard)
    weight_map = {name: shard for shard, shard_names in halves.items() for name in shard_names}
    (pickled / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    check_from_hf(GPT.from_hf(pickled), hf, idx)
    # An old-style checkpoint: pytorch_model.bin with GPT2Model's names and the causal-mask buffers.
    legacy = tmp_path / "legacy"
    hf.config.save_pretrained(legacy)
    state = {
        name.removeprefix("transformer."): tensor
        for name, tensor in hf.state_dict().items()
        if name != "lm_head.weight"
    }
    state["h.0.attn.bias"] = torch.tril(torch.ones(64, 64))[None, None]
    torch.save(state, legacy / "pytorch_model.bin")
    gpt = GPT.from_hf(str(legacy))
    assert gpt.config.n_inner == 96 and gpt.config.activation == "gelu"
    check_from_hf(gpt, hf, idx)


def test_from_hf_untied_and_body_only():
    untied = random_gpt2(tie_word_embeddings=False)
    with torch.no_grad():
        untied.lm_head.weight.normal_()
    gpt = GPT.from_hf(untied)
    assert gpt.lm_head.weight is not gpt.transformer.wte.weight
    check_from_hf(gpt, untied, torch.randint(0, VOCAB, (2, 9)))
    body = random_gpt2(GPT2Model)
    gpt = GPT.from_hf(body)
    idx = torch.randint(0, VOCAB, (2, 9))
    torch.testing.assert_close(gpt(idx), body(idx).last_hidden_state @ body.wte.weight.t(), rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"n_kv_head": 2, "activation": "gelu"},
        {"bias": False, "tie_weights": False, "activation": "relu", "n_inner": 48},
        {"activation": "silu", "dropout": 0.1, "vocab_size": 130},
    ],
    ids=["gpt2", "gqa", "no-bias-untied", "silu-dropout"],
)
def test_save_hf_loads_in_transformers_with_the_same_logits(fields, tmp_path):
    """GPT.save_hf writes a directory that GPT2LMHeadModel.from_pretrained loads, with every tensor it
    expects and nothing else, into a model whose logits equal the GPT's: grouped-query attention as
    repeated key/value heads, absent biases as zero biases, untied heads, every activation, a padded
    vocabulary cut to its real rows. GPT.from_hf reads it back to the same logits."""
    config = GPTConfig(
        n_layer=2, n_embd=32, n_head=4, block_size=16, backend="reference", **{"vocab_size": VOCAB, **fields}
    )
    gpt = GPT(config).eval()
    with torch.no_grad():  # move every weight off its initial value (biases start at 0, LayerNorm at 1)
        for parameter in gpt.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    gpt.save_hf(tmp_path)
    hf, loading = GPT2LMHeadModel.from_pretrained(tmp_path, output_loading_info=True)
    assert all(not names for names in loading.values()), (
        loading
    )  # no missing, unexpected or mismatched tensor
    assert hf.config.attn_pdrop == 0.0 and hf.config.resid_pdrop == config.dropout
    assert hf.config.tie_word_embeddings == config.tie_weights
    idx = torch.randint(0, config.vocab_size, (2, 12))
    expected = gpt(idx).detach()  # (2, 12, vocab_size)
    torch.testing.assert_close(hf.eval()(idx).logits, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(GPT.from_hf(tmp_path, backend="reference")(idx), expected, rtol=0, atol=1e-6)


def test_from_hf_errors(tmp_path):
    with pytest.raises(ValueError, match="scale_attn_by_inverse_layer_idx=True is not supported"):
        GPT.from_hf(random_gpt2(scale_attn_by_inverse_layer_idx=True))
    with pytest.raises(ValueError, match="activation_function must be one of .*got 'quick_gelu'"):
        GPT.from_hf(random_gpt2(activation_function="quick_gelu"))
    with pytest.raises(ValueError, match="weights outside the GPT-2 body and LM head are not supported"):
        GPT.from_hf(random_gpt2(transformers.GPT2ForSequenceClassification, pad_token_id=0))
    with pytest.raises(ValueError, match="must hold config.json"):
        GPT.from_hf(tmp_path)
    with pytest.raises(
        TypeError, match="model_or_dir must be a transformers GPT-2 model or a directory path, got int"
    ):
        GPT.from_hf(3)


# ----------------------------------------------------------------------------------------------
# attn_implementation="fastgpt"


def test_attention_interface_gpt2(attention_calls):
    torch.manual_seed(0)
    sdpa = random_gpt2()
    mine = GPT2LMHeadModel(gpt2_config(attn_implementation="fastgpt")).eval()
    mine.load_state_dict(sdpa.state_dict())
    idx = torch.randint(0, VOCAB, (2, 30))
    reference = copy.deepcopy(sdpa).double()
    assert_close(
        "logits", mine(idx).logits.detach(), reference(idx).logits.detach(), sdpa(idx).logits.detach()
    )
    assert attention_calls["fastgpt"] == 2


def llama(attn_implementation):
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, bos_token_id=None, eos_token_id=None, pad_token_id=None,
        attn_implementation=attn_implementation,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


def test_attention_interface_llama_gqa_rope(attention_calls):
    torch.manual_seed(0)
    sdpa = llama("sdpa")
    mine = llama("fastgpt")
    mine.load_state_dict(sdpa.state_dict())
    reference = copy.deepcopy(sdpa).double()
    idx = torch.randint(0, VOCAB, (2, 30))
    assert_close(
        "logits", mine(idx).logits.detach(), reference(idx).logits.detach(), sdpa(idx).logits.detach()
    )
    assert attention_calls == {"fastgpt": 2, "sdpa": 0}

    mask = torch.ones(2, 30, dtype=torch.long)
    mask[1, :7] = 0
    real = mask.bool()
    torch.testing.assert_close(
        mine(idx, attention_mask=mask).logits[real],
        sdpa(idx, attention_mask=mask).logits[real],
        rtol=0,
        atol=1e-5,
    )
    assert attention_calls["sdpa"] == 2  # the padded call kept its mask

    prompt = idx[:, :5]
    kwargs = {
        "attention_mask": torch.ones_like(prompt),
        "max_new_tokens": 10,
        "do_sample": False,
        "pad_token_id": 0,
    }
    assert torch.equal(mine.generate(prompt, **kwargs), sdpa.generate(prompt, **kwargs))


def musicgen_decoder(attn_implementation):
    config = transformers.MusicgenDecoderConfig(
        vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=2, num_codebooks=2,
        max_position_embeddings=64, pad_token_id=VOCAB - 1, bos_token_id=None, eos_token_id=None,
        decoder_start_token_id=None, attn_implementation=attn_implementation,
    )  # fmt: skip
    return transformers.MusicgenForCausalLM(config).eval()


def test_attention_weights_take_the_eager_route_with_its_mask(attention_calls):
    """A model that passes output_attentions to its attention function (MusicGen's decoder does; GPT-2
    and Llama drop it before attention) gets its eager function's output and weights from the "fastgpt"
    implementation, equal to the eager model's: the SDPA-style mask (None for plain causal, boolean
    with padding) is turned into the additive mask eager attention adds to its scores."""
    eager = musicgen_decoder("eager")
    mine = musicgen_decoder("fastgpt")
    mine.load_state_dict(eager.state_dict())
    idx = torch.randint(0, VOCAB - 1, (2 * 2, 12))  # (batch * codebooks, T)
    padding = torch.ones(2, 12, dtype=torch.long)
    padding[0, :4] = 0
    for mask in (None, padding):
        expected = eager(idx, attention_mask=mask, output_attentions=True)
        got = mine(idx, attention_mask=mask, output_attentions=True)
        torch.testing.assert_close(got.logits, expected.logits, rtol=0, atol=1e-6)
        for layer, (weights, expected_weights) in enumerate(zip(got.attentions, expected.attentions)):
            torch.testing.assert_close(weights, expected_weights, rtol=0, atol=1e-6, msg=f"layer {layer}")
    assert attention_calls == {"fastgpt": 0, "sdpa": 0}


def test_head_mask_takes_the_eager_route_and_stays_causal(attention_calls):
    """transformers 5 no longer applies head_mask, but a GPT-2 call still carries it through its
    **kwargs to the attention function, which sends it to GPT-2's eager function: with the mask that
    function expects (causal), the patched model's logits are the unpatched model's."""
    hf = random_gpt2()
    patched = fastgpt.patch(copy.deepcopy(hf))
    idx = torch.randint(0, VOCAB, (2, 12))
    head_mask = torch.ones(2, 4)  # (layers, heads)
    torch.testing.assert_close(patched(idx, head_mask=head_mask).logits, hf(idx).logits, rtol=0, atol=1e-5)
    assert attention_calls == {"fastgpt": 0, "sdpa": 0}


def test_import_fastgpt_does_not_import_transformers():
    code = "import sys, fastgpt; assert 'transformers' not in sys.modules; assert callable(fastgpt.patch)"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120, cwd=Path(__file__).parents[1])
