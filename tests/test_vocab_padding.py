"""fastgpt.nn.GPT pads its vocabulary (embedding and LM head rows) to a multiple of 64, invisibly:
the padded model computes exactly what the unpadded one does, never emits a padded id, and
checkpoints keep the real vocabulary's shapes."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import fastgpt
from fastgpt.nn import GPT, GPTConfig
from fastgpt.nn.weights import CheckpointError
from fastgpt.train import checkpoint
from fastgpt.train.loop import Settings, Trainer
from fastgpt.train.runtime import Runtime
from fastgpt.train.tokenizer import ByteTokenizer

VOCAB, PADDED_VOCAB = 97, 128
SMALL = {"n_layer": 2, "n_embd": 64, "n_head": 4, "vocab_size": VOCAB, "block_size": 64}
VOCAB_TENSORS = ("transformer.wte.weight", "lm_head.weight")


def randomised(model):
    """model with random LayerNorm weights and biases (they start at 1 and 0) and random, large
    padded vocabulary rows: were those rows read anywhere, the outputs would show it."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".ln_" in name:
                parameter.add_(0.1 * torch.randn_like(parameter))
        for weight in model.vocab_weights():
            weight[model.config.vocab_size :].normal_(0.0, 30.0)  # (padded - vocab, C)
    return model


def unpadded_copy(model):
    """The same model with vocab_padding_multiple=1: its vocabulary tensors are the padded model's
    first vocab_size rows, copied by hand."""
    config = GPTConfig(**{**model.config.to_dict(), "vocab_padding_multiple": 1})
    copy = GPT(config)
    with torch.no_grad():
        for name, parameter in copy.named_parameters():
            source = model.get_parameter(name)
            parameter.copy_(source[: config.vocab_size] if name in VOCAB_TENSORS else source)
    return copy


def test_padded_vocab_size_rule():
    assert GPTConfig().padded_vocab_size == 50304  # GPT-2's 50257, as nanoGPT pads it
    assert GPTConfig(**SMALL).padded_vocab_size == PADDED_VOCAB
    assert GPTConfig(**{**SMALL, "vocab_size": 128}).padded_vocab_size == 128
    assert GPTConfig(**{**SMALL, "vocab_size": 129}).padded_vocab_size == 192
    assert GPTConfig(**SMALL, vocab_padding_multiple=1).padded_vocab_size == VOCAB
    assert GPTConfig(**SMALL, vocab_padding_multiple=8).padded_vocab_size == 104
    for bad in (0, -64, 1.5, True):
        with pytest.raises(ValueError, match=f"vocab_padding_multiple must be a positive int, got {bad!r}"):
            GPTConfig(**SMALL, vocab_padding_multiple=bad)


@pytest.mark.parametrize("tie_weights", [True, False], ids=["tied", "untied"])
def test_parameters_are_padded_and_padding_starts_at_zero(tie_weights):
    model = GPT(GPTConfig(**SMALL, tie_weights=tie_weights))
    for name in VOCAB_TENSORS:
        weight = model.get_parameter(name)
        assert weight.shape == (PADDED_VOCAB, 64) and weight.is_contiguous()
        assert torch.equal(weight[VOCAB:], torch.zeros(PADDED_VOCAB - VOCAB, 64))
        assert weight[:VOCAB].std() > 0.01
    assert (model.lm_head.weight is model.transformer.wte.weight) == tie_weights
    assert model.num_params(non_embedding=False) == unpadded_copy(model).num_params(non_embedding=False)
    with torch.device("meta"):
        gpt2 = GPT(GPTConfig.preset("gpt2"))
    assert gpt2.transformer.wte.weight.shape == (50304, 768)
    assert gpt2.num_params(non_embedding=False) == 124_439_808  # the real GPT-2 small, padding left out


@pytest.mark.parametrize("backend", fastgpt.available_backends())
@pytest.mark.parametrize("tie_weights", [True, False], ids=["tied", "untied"])
def test_padded_model_equals_unpadded_model(tie_weights, backend):
    """Logits, loss and every gradient equal the unpadded model's on the real rows, on every backend,
    although the padded rows hold large random values (the loss takes the padded head and masks those
    rows out, GPT.loss_head); the padded rows' gradients are exactly zero."""
    padded = randomised(GPT(GPTConfig(**SMALL, tie_weights=tie_weights, backend=backend)))
    unpadded = unpadded_copy(padded)
    idx = torch.randint(0, VOCAB, (3, 29))
    targets = torch.randint(0, VOCAB, (3, 29))
    targets[1, :5] = -100

    with torch.no_grad():
        logits, expected_logits = padded(idx), unpadded(idx)
    assert logits.shape == (3, 29, VOCAB) and logits.stride(-2) == PADDED_VOCAB  # aligned rows
    torch.testing.assert_close(logits, expected_logits, rtol=1e-6, atol=1e-6)
    flat = logits.view(-1, VOCAB)  # nanoGPT's flattening works on the strided view
    torch.testing.assert_close(flat, expected_logits.view(-1, VOCAB), rtol=1e-6, atol=1e-6)

    loss, expected_loss = padded(idx, targets), unpadded(idx, targets)
    torch.testing.assert_close(loss, expected_loss, rtol=1e-6, atol=0)
    loss.backward()
    expected_loss.backward()
    expected_grads = dict(unpadded.named_parameters())
    for name, parameter in padded.named_parameters():
        expected = expected_grads[name].grad
        if name in VOCAB_TENSORS:
            assert torch.equal(parameter.grad[VOCAB:], torch.zeros(PADDED_VOCAB - VOCAB, 64)), name
            torch.testing.assert_close(parameter.grad[:VOCAB], expected, rtol=1e-6, atol=1e-7, msg=name)
        else:
            torch.testing.assert_close(parameter.grad, expected, rtol=1e-6, atol=1e-7, msg=name)


def generation_model(tie_weights):
    """A padded model whose LM head scores every padded id far above every real one: a padded
    logit that reached the sampler would always be chosen."""
    model = randomised(GPT(GPTConfig(**SMALL, tie_weights=tie_weights)))
    ln_f = model.transformer.ln_f
    with torch.no_grad():  # final hidden states near ln_f.bias, and padded rows along it
        ln_f.weight.mul_(0.05)
        ln_f.bias.normal_()
        model.lm_head.weight[VOCAB:] = 100 * ln_f.bias / ln_f.bias.norm()  # (padded - vocab, C)
        all_logits = model.lm_head(model.hidden_states(torch.randint(0, VOCAB, (4, 16))))  # (4, 16, padded)
    assert all_logits[..., VOCAB:].min() > all_logits[..., :VOCAB].max() + 100
    return model


@pytest.mark.parametrize("tie_weights", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize(
    "sampling",
    [
        {"temperature": 0},
        {"temperature": 1.0},
        {"temperature": 0.7, "top_k": 5},
        {"temperature": 1.3, "top_p": 0.9},
        {"temperature": 1.0, "top_k": 200, "top_p": 1.0},
    ],
    ids=["greedy", "sampled", "top_k", "top_p", "top_k_above_vocab"],
)
def test_generate_never_emits_padded_ids(tie_weights, sampling):
    model = generation_model(tie_weights)
    idx = torch.randint(0, VOCAB, (3, 5))
    out = model.generate(idx, 40, **sampling)
    assert out.shape == (3, 45)
    assert torch.equal(out[:, :5], idx)
    assert int(out.max()) < VOCAB and int(out.min()) >= 0
    unpadded = unpadded_copy(model)
    if sampling["temperature"] == 0:
        assert torch.equal(out, unpadded.generate(idx, 40, **sampling))
    else:
        torch.manual_seed(3)
        drawn = model.generate(idx, 40, **sampling)
        torch.manual_seed(3)
        assert torch.equal(drawn, unpadded.generate(idx, 40, **sampling))


@pytest.mark.parametrize("tie_weights", [True, False], ids=["tied", "untied"])
def test_save_writes_real_vocab_shapes_and_load_pads_again(tmp_path, tie_weights):
    model = randomised(GPT(GPTConfig(**SMALL, tie_weights=tie_weights)))
    model.save(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}  # noqa: SIM118
    assert shapes["transformer.wte.weight"] == (VOCAB, 64)
    assert shapes.get("lm_head.weight") == (None if tie_weights else (VOCAB, 64))
    assert json.loads((tmp_path / "config.json").read_text())["vocab_size"] == VOCAB

    loaded = GPT.load(tmp_path)
    assert loaded.config == model.config
    assert (loaded.lm_head.weight is loaded.transformer.wte.weight) == tie_weights
    for name in VOCAB_TENSORS:
        weight, original = loaded.get_parameter(name), model.get_parameter(name)
        assert weight.shape == (PADDED_VOCAB, 64)
        assert torch.equal(weight[:VOCAB], original[:VOCAB])
        assert torch.equal(weight[VOCAB:], torch.zeros(PADDED_VOCAB - VOCAB, 64))  # padding is not saved
    idx = torch.randint(0, VOCAB, (2, 10))
    targets = torch.randint(0, VOCAB, (2, 10))
    assert torch.equal(loaded(idx), model(idx))
    assert torch.equal(loaded(idx, targets), model(idx, targets))


def test_checkpoint_without_padding_field_loads(tmp_path):
    """A checkpoint written before vocabulary padding existed: no vocab_padding_multiple in
    config.json, vocab_size rows. It loads padded, computing what the unpadded model does."""
    reference = randomised(GPT(GPTConfig(**SMALL, vocab_padding_multiple=1)))
    fields = reference.config.to_dict()
    del fields["vocab_padding_multiple"]
    (tmp_path / "config.json").write_text(json.dumps(fields))
    state = {n: t.contiguous() for n, t in reference.state_dict().items() if n != "lm_head.weight"}
    save_file(state, str(tmp_path / "model.safetensors"))

    loaded = GPT.load(tmp_path)
    assert loaded.config.padded_vocab_size == PADDED_VOCAB
    assert loaded.transformer.wte.weight.shape == (PADDED_VOCAB, 64)
    idx = torch.randint(0, VOCAB, (2, 12))
    torch.testing.assert_close(loaded(idx), reference(idx), rtol=1e-6, atol=1e-6)
    assert torch.equal(loaded(idx, idx), reference(idx, idx))
    unpadded = GPT.load(tmp_path, vocab_padding_multiple=1)
    assert unpadded.transformer.wte.weight.shape == (VOCAB, 64)
    assert torch.equal(unpadded(idx), reference(idx))


@pytest.mark.parametrize("tie_weights", [True, False], ids=["tied", "untied"])
def test_load_state_dict_takes_padded_or_real_vocab_rows(tie_weights):
    source = randomised(GPT(GPTConfig(**SMALL, tie_weights=tie_weights)))
    idx = torch.randint(0, VOCAB, (2, 9))
    for state in (source.state_dict(), unpadded_copy(source).state_dict()):
        model = GPT(GPTConfig(**SMALL, tie_weights=tie_weights))
        model.load_state_dict(state)
        assert (model.lm_head.weight is model.transformer.wte.weight) == tie_weights
        assert model.transformer.wte.weight.shape == (PADDED_VOCAB, 64)
        torch.testing.assert_close(model(idx), source(idx), rtol=1e-6, atol=1e-6)
    assert source.state_dict()["transformer.wte.weight"].shape == (PADDED_VOCAB, 64)  # as nanoGPT's

    state = source.state_dict()
    state["transformer.wte.weight"] = torch.randn(100, 64)
    with pytest.raises(
        CheckpointError,
        match=r"wte\.weight must have shape \(97, 64\) \(or, padded, \(128, 64\)\).*got \(100, 64\)",
    ):
        GPT(GPTConfig(**SMALL, tie_weights=tie_weights)).load_state_dict(state)


@pytest.mark.parametrize("tie_weights", [True, False], ids=["tied", "untied"])
def test_from_hf_pads_and_round_trips(tmp_path, tie_weights):
    transformers = pytest.importorskip("transformers")
    hf_config = transformers.GPT2Config(
        n_layer=2, n_embd=64, n_head=4, vocab_size=VOCAB, n_positions=64, tie_word_embeddings=tie_weights,
        bos_token_id=None, eos_token_id=None,
    )  # fmt: skip
    hf = transformers.GPT2LMHeadModel(hf_config).eval()
    with torch.no_grad():
        hf.lm_head.weight.normal_(0.0, 0.05)
    hf.save_pretrained(tmp_path / "hf")
    idx = torch.randint(0, VOCAB, (2, 17))
    with torch.no_grad():
        expected = hf(idx).logits  # (2, 17, VOCAB)

    for gpt in (GPT.from_hf(hf), GPT.from_hf(tmp_path / "hf")):
        assert gpt.config.vocab_size == VOCAB and gpt.transformer.wte.weight.shape == (PADDED_VOCAB, 64)
        assert (gpt.lm_head.weight is gpt.transformer.wte.weight) == tie_weights
        for name in VOCAB_TENSORS:
            assert torch.equal(gpt.get_parameter(name)[VOCAB:], torch.zeros(PADDED_VOCAB - VOCAB, 64))
        torch.testing.assert_close(gpt(idx), expected, rtol=1e-4, atol=1e-4)

        gpt.save(tmp_path / "fastgpt")
        with safe_open(str(tmp_path / "fastgpt" / "model.safetensors"), framework="pt") as f:
            assert tuple(f.get_slice("transformer.wte.weight").get_shape()) == (VOCAB, 64)
            assert torch.equal(f.get_tensor("transformer.wte.weight"), hf.transformer.wte.weight)
        assert torch.equal(GPT.load(tmp_path / "fastgpt")(idx), gpt(idx))


@pytest.mark.gpu
@pytest.mark.parametrize("tie_weights", [True, False], ids=["tied", "untied"])
def test_gpu_gpt_weights_keep_the_padding_invisible_on_cuda_in_bfloat16(tmp_path, tie_weights):
    """save from, load onto and from_hf of CUDA bfloat16 models: the loaded model's padded rows are zeros
    on the GPU in bfloat16, and it generates (greedy and top-k, seeded) what the saved model, whose
    padded rows would win every draw, generated; from_hf keeps the source's device and dtype."""
    transformers = pytest.importorskip("transformers")
    model = generation_model(tie_weights).to("cuda", torch.bfloat16)
    model.save(tmp_path)
    loaded = GPT.load(tmp_path, device="cuda")
    assert (loaded.lm_head.weight is loaded.transformer.wte.weight) == tie_weights
    for name in VOCAB_TENSORS:
        weight = loaded.get_parameter(name)  # (PADDED_VOCAB, 64)
        assert weight.is_cuda and weight.dtype == torch.bfloat16 and weight.shape == (PADDED_VOCAB, 64)
        assert torch.equal(weight[:VOCAB], model.get_parameter(name)[:VOCAB]) and not weight[VOCAB:].any()
    idx = torch.randint(0, VOCAB, (2, 10), device="cuda")
    for sampling in ({"temperature": 0}, {"temperature": 1.0, "top_k": 5}):
        torch.manual_seed(3)
        expected = model.generate(idx, 20, **sampling)
        assert int(expected.max()) < VOCAB
        torch.manual_seed(3)
        assert torch.equal(loaded.generate(idx, 20, **sampling), expected)

    hf_config = transformers.GPT2Config(
        n_layer=2, n_embd=64, n_head=4, vocab_size=VOCAB, n_positions=64, tie_word_embeddings=tie_weights,
        bos_token_id=None, eos_token_id=None,
    )  # fmt: skip
    hf = transformers.GPT2LMHeadModel(hf_config).to("cuda", torch.bfloat16).eval()
    gpt = GPT.from_hf(hf)
    assert (gpt.lm_head.weight is gpt.transformer.wte.weight) == tie_weights
    for name in VOCAB_TENSORS:
        weight = gpt.get_parameter(name)  # (PADDED_VOCAB, 64)
        assert weight.is_cuda and weight.dtype == torch.bfloat16 and not weight[VOCAB:].any()
    assert torch.equal(gpt.transformer.wte.weight[:VOCAB], hf.transformer.wte.weight)
    assert torch.equal(gpt.transformer.h[1].attn.c_attn.weight, hf.transformer.h[1].attn.c_attn.weight.t())
    assert int(gpt.generate(idx, 8, temperature=0).max()) < VOCAB


def byte_trainer(model, tokens):
    """A float32 CPU Trainer over byte tokens (train on the first 3000, evaluate on the rest)."""
    settings = Settings(steps=4, batch_size=4, seq_len=16, lr=3e-3, eval_windows=2)
    runtime = Runtime(torch.device("cpu"), torch.float32)
    return Trainer(model, ByteTokenizer(), tokens[:3000], tokens[3000:], settings, runtime)


def test_training_checkpoint_holds_real_vocab_rows(tmp_path):
    """The Trainer's checkpoint: model weights and AdamW moments with vocab_size rows (the padded
    rows' moments are zero, having had zero gradients), padded again on resume."""
    tokens = torch.randint(0, 257, (4000,))
    trainer = byte_trainer(
        GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=257)), tokens
    )
    for _ in range(2):
        trainer.train_step()
    wte = trainer.model.transformer.wte.weight
    moments = trainer.optimizer.state[wte]
    assert wte.shape == (320, 32)
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(moments[key][257:], torch.zeros(63, 32))
    trainer.save(str(tmp_path))
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        assert tuple(f.get_slice("transformer.wte.weight").get_shape()) == (257, 32)
    with safe_open(str(tmp_path / checkpoint.STATE_FILE), framework="pt") as f:
        for key in ("exp_avg", "exp_avg_sq"):
            assert tuple(f.get_slice(f"optimizer.transformer.wte.weight.{key}").get_shape()) == (257, 32)

    model, _ = checkpoint.load_model(str(tmp_path), device="cpu", dtype=torch.float32)
    resumed = byte_trainer(model, tokens)
    resumed.resume(str(tmp_path))
    resumed_moments = resumed.optimizer.state[resumed.model.transformer.wte.weight]
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(resumed_moments[key], moments[key])
    assert resumed.train_step() == trainer.train_step()
