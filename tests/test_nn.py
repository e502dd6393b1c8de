"""fastgpt.nn: configs, modules and the GPT against an eager nanoGPT-style model, save/load, compile."""

import copy

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from tolerance import assert_close

import fastgpt
from fastgpt import dispatch
from fastgpt.bench.timing import saved_for_backward
from fastgpt.nn import GPT, PRESETS, GPTConfig, LayerNorm
from fastgpt.reference import layer_norm as reference_layer_norm

SMALL = {"n_layer": 2, "n_embd": 64, "n_head": 4, "vocab_size": 97, "block_size": 64}


def eager_logits(model, idx):
    """The same GPT written with plain torch ops (F.layer_norm, SDPA, F.gelu), reading model's parameters
    (the LM head's first vocab_size rows: the padded ones are no part of the model)."""
    config, tr = model.config, model.transformer
    batch, seq = idx.shape
    heads, kv_heads, head_dim, channels = config.n_head, config.n_kv_head, config.head_dim, config.n_embd
    x = tr.wte(idx) + tr.wpe(torch.arange(seq))
    for block in tr.h:
        h = F.layer_norm(x, (channels,), block.ln_1.weight, block.ln_1.bias, config.layer_norm_eps)
        q, k, v = F.linear(h, block.attn.c_attn.weight, block.attn.c_attn.bias).split(
            (heads * head_dim, kv_heads * head_dim, kv_heads * head_dim), dim=-1
        )
        q = q.view(batch, seq, heads, head_dim).transpose(1, 2)
        k = k.view(batch, seq, kv_heads, head_dim).transpose(1, 2)
        v = v.view(batch, seq, kv_heads, head_dim).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        y = y.transpose(1, 2).reshape(batch, seq, channels)
        x = x + F.linear(y, block.attn.c_proj.weight, block.attn.c_proj.bias)
        h = F.layer_norm(x, (channels,), block.ln_2.weight, block.ln_2.bias, config.layer_norm_eps)
        h = F.gelu(F.linear(h, block.mlp.c_fc.weight, block.mlp.c_fc.bias), approximate="tanh")
        x = x + F.linear(h, block.mlp.c_proj.weight, block.mlp.c_proj.bias)
    x = F.layer_norm(x, (channels,), tr.ln_f.weight, tr.ln_f.bias, config.layer_norm_eps)
    return F.linear(x, model.lm_head.weight[: config.vocab_size])  # the real vocabulary's rows


def random_model(**overrides):
    model = GPT(GPTConfig(**{**SMALL, **overrides}))
    with torch.no_grad():  # LayerNorm starts at (1, 0); random values exercise its weight and bias
        for name, parameter in model.named_parameters():
            if ".ln_" in name:
                parameter.copy_(
                    1.0 + 0.1 * torch.randn_like(parameter)
                    if name.endswith("weight")
                    else 0.1 * torch.randn_like(parameter)
                )
    return model


def test_presets():
    assert set(PRESETS) == {"tiny", "gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"}
    expected = {
        "gpt2": (12, 12, 768),
        "gpt2-medium": (24, 16, 1024),
        "gpt2-large": (36, 20, 1280),
        "gpt2-xl": (48, 25, 1600),
    }
    for name, (layers, heads, width) in expected.items():
        config = GPTConfig.preset(name)
        assert (config.n_layer, config.n_head, config.n_embd, config.vocab_size, config.block_size) == (
            layers, heads, width, 50257, 1024,
        )  # fmt: skip
    with torch.device("meta"):
        gpt2 = GPT(GPTConfig.preset("gpt2"))
    assert gpt2.num_params(non_embedding=False) == 124_439_808  # GPT-2 small with its tied LM head
    assert GPTConfig.preset("tiny", dropout=0.1).dropout == 0.1
    with pytest.raises(ValueError, match="preset: name must be one of .*got 'gpt3'"):
        GPTConfig.preset("gpt3")


@pytest.mark.parametrize(
    "fields, pattern",
    [
        ({"n_embd": 65}, "n_embd must be divisible by n_head, got n_embd=65, n_head=4"),
        ({"n_kv_head": 3}, "n_head must be a multiple of n_kv_head .*n_head=4, n_kv_head=3"),
        ({"dropout": 1.0}, r"dropout must be in \[0, 1\), got 1.0"),
        ({"activation": "tanh"}, "activation must be one of .*got 'tanh'"),
        ({"backend": "fast"}, "backend must be one of .*got 'fast'"),
        ({"n_layer": 0}, "n_layer must be a positive int, got 0"),
    ],
)
def test_config_rejects_bad_fields(fields, pattern):
    with pytest.raises(ValueError, match=pattern):
        GPTConfig(**{**SMALL, **fields})


def test_state_dict_names_follow_nanogpt():
    model = GPT(GPTConfig(**{**SMALL, "n_layer": 1}))
    block = [f"transformer.h.0.{name}" for name in (
        "ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias", "attn.c_proj.weight", "attn.c_proj.bias",
        "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight", "mlp.c_proj.bias",
    )]  # fmt: skip
    expected = [
        "transformer.wte.weight",
        "transformer.wpe.weight",
        *block,
        "transformer.ln_f.weight",
        "transformer.ln_f.bias",
        "lm_head.weight",
    ]
    assert list(model.state_dict()) == expected
    assert model.lm_head.weight is model.transformer.wte.weight
    assert GPT(GPTConfig(**SMALL, tie_weights=False)).lm_head.weight is not None
    assert "transformer.h.0.ln_1.bias" not in GPT(GPTConfig(**{**SMALL, "bias": False})).state_dict()


def test_qkv_split_is_a_view():
    attn = random_model(n_kv_head=2).transformer.h[0].attn
    qkv = attn.c_attn(torch.randn(2, 5, 64))  # (B, T, (H + 2*Hkv) * D)
    q, k, v = attn.split_heads(qkv)
    assert (q.shape, k.shape, v.shape) == ((2, 4, 5, 16), (2, 2, 5, 16), (2, 2, 5, 16))
    for part in (q, k, v):
        assert part.untyped_storage().data_ptr() == qkv.untyped_storage().data_ptr()


def test_layer_norm_module_with_fused_residual():
    norm = LayerNorm(48, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(48))
        norm.bias.copy_(torch.randn(48))
    x, residual = torch.randn(3, 7, 48), torch.randn(3, 7, 48)
    out, summed = norm(x, residual=residual)
    ref_out, ref_sum = reference_layer_norm(
        x.double(), norm.weight.double(), norm.bias.double(), residual=residual.double()
    )
    eager_out = F.layer_norm(x + residual, (48,), norm.weight, norm.bias)
    assert_close("layer_norm out", out.detach(), ref_out, eager_out.detach())
    assert_close("layer_norm x + residual", summed, ref_sum, x + residual)


@pytest.mark.parametrize("n_kv_head", [4, 2], ids=["mha", "gqa"])
def test_gpt_matches_eager_model(n_kv_head):
    """Logits, loss and the gradient of every parameter against the same model in plain torch ops:
    float64 is the reference, float32 eager the error budget (tests/tolerance.py)."""
    model = random_model(n_kv_head=n_kv_head)
    model_eager = copy.deepcopy(model)
    model64 = copy.deepcopy(model).double()
    idx = torch.randint(0, 97, (3, 29))
    targets = torch.randint(0, 97, (3, 29))
    targets[0, :4] = -100  # ignored positions

    with torch.no_grad():
        logits = model(idx)
        assert logits.shape == (3, 29, 97)
        assert_close("logits", logits, eager_logits(model64, idx), eager_logits(model_eager, idx))

    loss = model(idx, targets)
    eager_loss = F.cross_entropy(eager_logits(model_eager, idx).flatten(0, 1), targets.flatten())
    loss64 = F.cross_entropy(eager_logits(model64, idx).flatten(0, 1), targets.flatten())
    for value in (loss, eager_loss, loss64):
        value.backward()
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert_close("loss", loss.detach(), loss64.detach(), eager_loss.detach())
    mine, eager = dict(model.named_parameters()), dict(model_eager.named_parameters())
    for name, parameter in model64.named_parameters():
        assert_close(f"grad {name}", mine[name].grad, parameter.grad, eager[name].grad)


def test_backend_reaches_every_op():
    model = random_model(backend="reference")
    assert {m.backend for m in model.modules() if hasattr(m, "backend")} == {"reference"}
    idx = torch.randint(0, 97, (2, 8))
    expected = model(idx)
    model.set_backend("cuda")  # not runnable on CPU tensors: the error proves the setting is used
    with pytest.raises(ValueError, match="backend 'cuda' does not run on cpu tensors"):
        model(idx)
    model.set_backend("auto")
    torch.testing.assert_close(model(idx), expected, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="set_backend: backend must be one of .*got 'gpu'"):
        model.set_backend("gpu")


def test_dropout_only_in_training():
    model = random_model(dropout=0.3)
    idx = torch.randint(0, 97, (2, 16))
    no_dropout = GPT(GPTConfig(**SMALL))
    no_dropout.load_state_dict(model.state_dict())
    model.eval()
    torch.testing.assert_close(model(idx), no_dropout(idx), rtol=0, atol=0)
    model.train()
    torch.manual_seed(1)
    first = model(idx, idx)
    torch.manual_seed(1)
    again = model(idx, idx)
    second = model(idx, idx)
    assert first.item() == again.item()  # reproducible under a seed
    assert first.item() != second.item()  # and actually random
    assert first.item() != no_dropout(idx, idx).item()


def test_forward_errors():
    model = random_model()
    with pytest.raises(ValueError, match="sequence length must be <= block_size=64, got 65"):
        model(torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(ValueError, match=r"idx must have shape \(batch, seq_len\), got \(5,\)"):
        model(torch.zeros(5, dtype=torch.long))
    with (
        torch.autocast("cpu", dtype=torch.bfloat16),
        pytest.raises(RuntimeError, match="autocast is not supported"),
    ):
        model(torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(TypeError, match="config must be a GPTConfig, got dict"):
        GPT(SMALL)


@pytest.mark.parametrize("tie_weights", [True, False], ids=["tied", "untied"])
def test_save_load_round_trip(tmp_path, tie_weights):
    model = random_model(tie_weights=tie_weights, n_kv_head=2)
    model.save(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        # A tied head is stored once. (safe_open is not iterable, hence keys().)
        assert ("lm_head.weight" in f.keys()) == (not tie_weights)  # noqa: SIM118
    loaded = GPT.load(tmp_path)
    assert loaded.config == model.config
    assert (loaded.lm_head.weight is loaded.transformer.wte.weight) == tie_weights
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    idx = torch.randint(0, 97, (2, 10))
    assert torch.equal(loaded(idx), model(idx))
    assert GPT.load(tmp_path, dropout=0.2).config.dropout == 0.2


COMPILE_CASES = [pytest.param(True, "auto", id="tied"), pytest.param(False, "auto", id="untied")]
if "triton" in fastgpt.available_backends() and not torch.cuda.is_available():
    # The Triton ops' custom-op registrations (fake outputs, autograd) as --step-mode compile meets them
    # on a GPU, where the loss always runs on Triton; here through the interpreter.
    COMPILE_CASES.append(pytest.param(True, "triton", id="tied-triton"))


@pytest.fixture
def fresh_dynamo():
    """An empty dynamo cache before and after the test: the compile tests here compile the same code
    objects (GPT.forward, the blocks, the ops) for new models, and their cache entries would otherwise
    add up to dynamo's recompile limit (8) across tests."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("tie_weights, backend", COMPILE_CASES)
def test_torch_compile_fullgraph(tie_weights, backend, fresh_dynamo):
    """Inductor compiles the GPT in one graph each for logits and for the loss, and matches eager."""
    model = random_model(n_layer=1, tie_weights=tie_weights, backend=backend)  # one block: every op
    idx = torch.randint(0, 97, (2, 16))
    targets = torch.randint(0, 97, (2, 16))
    expected_logits = model(idx)
    expected_loss = model(idx, targets)
    expected_loss.backward()
    expected_grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()

    compiled = torch.compile(model, fullgraph=True)
    torch.testing.assert_close(compiled(idx), expected_logits, rtol=1e-5, atol=1e-5)
    loss = compiled(idx, targets)
    torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-5)
    loss.backward()
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(parameter.grad, expected_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_torch_compile_with_dynamic_shapes_keeps_one_graph(fresh_dynamo):
    """With dynamic shapes (dynamic=True, or torch.compile's automatic dynamic after a recompile for a
    new batch size) the routing facts stay constants: a fact computed as a symbolic comparison of the
    batch broke the graph at dispatch.choose_backend. Two batch sizes and two lengths, each matching eager."""
    model = random_model(n_layer=1)
    compiled = torch.compile(model, fullgraph=True, dynamic=True, backend="eager")
    for batch, length in ((2, 16), (3, 11)):
        idx = torch.randint(0, 97, (batch, length))
        torch.testing.assert_close(compiled(idx, idx), model(idx, idx), rtol=1e-5, atol=1e-5)


def test_torch_compile_before_any_eager_call(monkeypatch, fresh_dynamo):
    """torch.compile as the very first use of the ops in a process (dispatch caches empty)."""
    for slot in dispatch.IMPLEMENTATION_SLOTS.values():
        monkeypatch.setattr(slot, "function", None)
    dispatch.forget_choices()
    model = random_model(n_layer=1)
    idx = torch.randint(0, 97, (2, 8))
    try:
        compiled = torch.compile(model, fullgraph=True, backend="eager")
        assert compiled(idx, idx).dim() == 0
    finally:
        dispatch.forget_choices()


# ----------------------------------------------------------------------------------------------
# Activation checkpointing

CHECKPOINT_BACKENDS = ["auto", "reference"] + (["triton"] if "triton" in fastgpt.available_backends() else [])


def loss_and_gradients(model, idx, targets, forward=None):
    """The loss of forward(idx, targets) (model by default) and the gradients left in model's parameters."""
    model.zero_grad()
    torch.manual_seed(7)  # the dropout masks
    loss = (model if forward is None else forward)(idx, targets)
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def saved_activations(model, idx, targets):
    """What the backward of model(idx, targets) keeps, parameters left out: (shape, bytes) per storage."""
    return saved_for_backward(lambda: model(idx, targets), model.parameters())


@pytest.mark.parametrize("backend", CHECKPOINT_BACKENDS)
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_activation_checkpointing_gives_the_same_loss_and_gradients(backend, dropout):
    """Recomputing each block in the backward gives the loss and every gradient bit for bit (the same
    kernels on the same inputs), dropout included: its masks are drawn again from the saved state."""
    model = random_model(n_layer=3, dropout=dropout, backend=backend).train()
    idx, targets = torch.randint(0, 97, (2, 24)), torch.randint(0, 97, (2, 24))
    loss, gradients = loss_and_gradients(model, idx, targets)
    assert model.set_activation_checkpointing() is model and model.activation_checkpointing
    checkpointed_loss, checkpointed_gradients = loss_and_gradients(model, idx, targets)
    assert torch.equal(checkpointed_loss, loss)
    for name, gradient in gradients.items():
        assert torch.equal(checkpointed_gradients[name], gradient), name
    with torch.no_grad():  # no graph to keep: the plain path, and generation, as before
        assert torch.equal(model.eval()(idx), model.set_activation_checkpointing(False)(idx))


def test_activation_checkpointing_keeps_only_each_blocks_input():
    """What the backward keeps: without checkpointing, every block's intermediates (its (B, T, 4C) MLP
    hidden state among them); with it, one (B, T, C) input per block and what the final LayerNorm and the
    loss keep, a fraction of the memory."""
    model = random_model(n_layer=4).train()
    idx, targets = torch.randint(0, 97, (2, 32)), torch.randint(0, 97, (2, 32))
    plain = saved_activations(model, idx, targets)
    checkpointed = saved_activations(model.set_activation_checkpointing(), idx, targets)
    hidden = (2, 32, 4 * 64)
    assert sum(shape == hidden for shape, _ in plain) >= 4
    assert not any(shape == hidden for shape, _ in checkpointed)
    assert sum(shape == (2, 32, 64) for shape, _ in checkpointed) >= 4
    plain_bytes, checkpointed_bytes = (sum(nbytes for _, nbytes in saved) for saved in (plain, checkpointed))
    assert checkpointed_bytes < 0.4 * plain_bytes, (checkpointed_bytes, plain_bytes)


def test_activation_checkpointing_under_torch_compile(fresh_dynamo):
    """torch.compile(fullgraph=True) traces the checkpointed blocks (its `fastgpt train --step-mode compile`)
    to the eager model's loss and gradients."""
    model = random_model(n_layer=2).train()
    idx, targets = torch.randint(0, 97, (2, 16)), torch.randint(0, 97, (2, 16))
    loss, gradients = loss_and_gradients(model, idx, targets)
    compiled = torch.compile(model.set_activation_checkpointing(), fullgraph=True)
    compiled_loss, compiled_gradients = loss_and_gradients(model, idx, targets, forward=compiled)
    torch.testing.assert_close(compiled_loss, loss, rtol=1e-5, atol=1e-5)
    for name, gradient in gradients.items():
        torch.testing.assert_close(compiled_gradients[name], gradient, rtol=1e-4, atol=1e-6, msg=name)


def test_activation_checkpointing_takes_a_bool():
    with pytest.raises(TypeError, match=r"enabled must be a bool, got 'yes'"):
        random_model().set_activation_checkpointing("yes")
