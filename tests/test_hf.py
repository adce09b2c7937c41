"""Layer-k capture from Hugging Face decoder-only models (mini models from configs, random init)."""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from mlc_kernels import MLCHead, mlc_loss  # noqa: E402
from mlc_kernels.hf import (  # noqa: E402
    decoder_layers,
    grad_cached_mlc_backward,
    last_prompt_hidden,
    last_token_index,
    variant_representations,
)

FAMILIES = ["llama", "qwen2", "qwen3", "mistral", "gemma", "phi3"]
LAYERS = 4


def tiny_model(family: str, *, dropout: float = 0.0, dtype=torch.float64, seed: int = 0):
    common = dict(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=LAYERS, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, attention_dropout=dropout,
    )  # fmt: skip
    config = {
        "llama": lambda: transformers.LlamaConfig(**common),
        "qwen2": lambda: transformers.Qwen2Config(**common),
        "qwen3": lambda: transformers.Qwen3Config(head_dim=8, **common),
        "mistral": lambda: transformers.MistralConfig(**common),
        "gemma": lambda: transformers.GemmaConfig(head_dim=8, **common),
        "phi3": lambda: transformers.Phi3Config(pad_token_id=0, **common),
    }[family]()
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).to(dtype)
    return model.eval()


def batch(b: int = 3, t: int = 7, side: str = "right", seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 64, (b, t), generator=gen)
    att = torch.ones(b, t, dtype=torch.long)
    lengths = torch.tensor([t, t - 2, t - 3, t - 1, t][:b])
    for i, n in enumerate(lengths.tolist()):
        if side == "right":
            att[i, n:] = 0
        else:
            att[i, : t - n] = 0
    return ids, att


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("side", ["right", "left"])
def test_matches_output_hidden_states(family, side):
    model = tiny_model(family)
    ids, att = batch(side=side)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=att, output_hidden_states=True)
    rows = torch.arange(ids.shape[0])
    last = last_token_index(att)
    if side == "right":
        assert torch.equal(last, att.sum(1) - 1)
    for k in range(1, LAYERS):
        for truncate in (True, False):
            got = last_prompt_hidden(model, ids, att, k, truncate=truncate)
            torch.testing.assert_close(got, out.hidden_states[k][rows, last], rtol=1e-12, atol=1e-12)
    # layer = L: the last layer's output before the final norm; the norm of it is hidden_states[L]
    got = last_prompt_hidden(model, ids, att, -1)
    norm = decoder_layers(model)[1]
    torch.testing.assert_close(norm(got[:, None])[:, 0], out.hidden_states[LAYERS][rows, last], rtol=1e-10, atol=1e-10)


def _problem(n=2, m=3, t=6, seed=2):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 64, (n, m, t), generator=gen)
    att = torch.ones(n, m, t, dtype=torch.long)
    att[0, 1, 4:] = 0
    att[1, 2, 3:] = 0
    mask = torch.ones(n, m, dtype=torch.bool)
    return ids, att, mask


def _grads(model):
    return {name: (p.grad.clone() if p.grad is not None else None) for name, p in model.named_parameters()}


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_truncated_and_full_give_same_loss_and_gradients(family):
    k = 2
    model = tiny_model(family)
    head = MLCHead(32, 8).double()
    ids, att, mask = _problem()
    results = {}
    for truncate in (True, False):
        model.zero_grad(set_to_none=True)
        reps, _ = variant_representations(model, ids, att, k, mask, truncate=truncate)
        loss = mlc_loss(head(reps), mask, impl="torch")
        loss.backward()
        results[truncate] = (loss.detach(), _grads(model))
    torch.testing.assert_close(results[True][0], results[False][0], rtol=1e-12, atol=0)
    for name, grad in results[False][1].items():
        truncated = results[True][1][name]
        above = (
            any(f"layers.{i}." in name for i in range(k, LAYERS)) or "lm_head" in name or name == "model.norm.weight"
        )
        if above or grad is None:
            assert truncated is None or not truncated.any(), name  # no gradient above layer k
        else:
            torch.testing.assert_close(truncated, grad, rtol=1e-9, atol=1e-12)


def test_model_unchanged_when_the_forward_raises():
    model = tiny_model("llama")
    ids, att = batch()
    layers, norm = decoder_layers(model)
    before = last_prompt_hidden(model, ids, att, 3)

    def boom(module, args):
        raise RuntimeError("boom")

    handle = layers[1].register_forward_pre_hook(boom)
    with pytest.raises(RuntimeError, match="boom"):
        last_prompt_hidden(model, ids, att, 3)
    handle.remove()
    for module in [*layers, norm]:
        assert not module._forward_pre_hooks and not module._forward_hooks
    assert model.model.layers is layers and len(model.model.layers) == 4  # the full stack is back
    assert isinstance(model.lm_head, torch.nn.Linear)  # and the LM head
    torch.testing.assert_close(last_prompt_hidden(model, ids, att, 3), before, rtol=0, atol=0)


def test_no_grad_and_gradient_checkpointing():
    model = tiny_model("qwen2")
    ids, att = batch()
    with torch.no_grad():
        assert not last_prompt_hidden(model, ids, att, 2).requires_grad
    plain = last_prompt_hidden(model, ids, att, 2)
    plain.square().sum().backward()
    expected = _grads(model)
    model.zero_grad(set_to_none=True)
    model.gradient_checkpointing_enable()
    model.train()  # checkpointing is active in train mode (no dropout in this config)
    checkpointed = last_prompt_hidden(model, ids, att, 2)
    checkpointed.square().sum().backward()
    torch.testing.assert_close(checkpointed, plain)
    for name, grad in _grads(model).items():
        if expected[name] is None:
            assert grad is None or not grad.any(), name
        else:
            torch.testing.assert_close(grad, expected[name], rtol=1e-9, atol=1e-12)


def test_peft_lora_model():
    peft = pytest.importorskip("peft")
    model = tiny_model("llama")
    ids, att = batch()
    reference = last_prompt_hidden(model, ids, att, 2)
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    got = last_prompt_hidden(lora, ids, att, 2)
    torch.testing.assert_close(got, reference)  # LoRA B starts at zero
    got.square().sum().backward()
    grads = {n: p.grad for n, p in lora.named_parameters() if p.requires_grad}
    assert any(g is not None and g.any() for n, g in grads.items() if "layers.0." in n)
    assert all(g is None or not g.any() for n, g in grads.items() if "layers.3." in n)


def test_bad_layer_and_unknown_architecture():
    model = tiny_model("mistral")
    ids, att = batch()
    for layer in (0, 5, -5, 1.5):
        with pytest.raises(ValueError, match=r"1\.\.4 or -4\.\.-1 or 'final' for MistralForCausalLM"):
            last_prompt_hidden(model, ids, att, layer)
    with pytest.raises(TypeError, match="Linear: cannot find a stack of decoder layers"):
        last_prompt_hidden(torch.nn.Linear(3, 3), ids, att, 1)
    with pytest.raises(ValueError, match="attention_mask has a row with no token"):
        last_prompt_hidden(model, ids, torch.zeros_like(att), 1)


def test_variant_representations_skip_missing_variants():
    model = tiny_model("llama")
    ids, att, mask = _problem()
    mask[1, 0] = False
    reps, out_mask = variant_representations(model, ids, att, 2, mask, micro_batch=2)
    assert reps.shape == (2, 3, 32) and torch.equal(out_mask, mask)
    assert not reps[1, 0].any()
    single = last_prompt_hidden(model, ids[0], att[0], 2)
    torch.testing.assert_close(reps[0], single)


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_grad_cache_matches_plain_path(dropout):
    k = 2
    ids, att, mask = _problem(n=3)
    mask[2, 1] = False
    results = []
    for cached in (False, True):
        model = tiny_model("llama", dropout=dropout).train()
        torch.manual_seed(0)
        head = MLCHead(32, 8).double()

        def loss_fn(reps, m, head=head):
            return 0.5 * mlc_loss(head(reps), m, impl="torch")

        torch.manual_seed(123)
        losses = []
        for micro in (slice(0, 2), slice(2, 3)):  # gradient accumulation over two micro-batches
            if cached:
                losses.append(grad_cached_mlc_backward(model, loss_fn, ids[micro], att[micro], k, mask[micro],
                                                      chunk_prompts=1))  # fmt: skip
            else:
                parts = [
                    variant_representations(
                        model, ids[micro][i : i + 1], att[micro][i : i + 1], k, mask[micro][i : i + 1]
                    )[0]
                    for i in range(ids[micro].shape[0])
                ]
                loss = loss_fn(torch.cat(parts), mask[micro])
                loss.backward()
                losses.append(loss.detach())
        results.append((losses, _grads(model), head.weight.grad.clone()))
    (plain_losses, plain_grads, plain_head), (cached_losses, cached_grads, cached_head) = results
    for a, b in zip(plain_losses, cached_losses, strict=True):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(cached_head, plain_head)
    for name, grad in plain_grads.items():
        if grad is None:
            assert cached_grads[name] is None or not cached_grads[name].any()
        else:
            torch.testing.assert_close(cached_grads[name], grad, rtol=1e-9, atol=1e-12)


def test_auto_chunk_prompts_fits_the_budget_and_matches_the_plain_path():
    from mlc_kernels.hf import activation_bytes_per_prompt, auto_chunk_prompts

    model = tiny_model("llama")
    ids, att, mask = _problem(n=9)
    per_prompt = activation_bytes_per_prompt(model, ids, att, 2)
    assert per_prompt == 3 * ids.shape[-1] * 2 * (34 * 32 + 5 * 4 * ids.shape[-1]) // 2 * 8  # m t k (34h + 5at)/2 bytes
    assert auto_chunk_prompts(model, ids, att, 2) == 2  # a quarter of 9 prompts
    assert auto_chunk_prompts(model, ids, att, 2, memory_budget=5 * per_prompt + 1) == 5
    assert auto_chunk_prompts(model, ids, att, 2, memory_budget=1) == 1
    assert auto_chunk_prompts(model, ids, att, 2, memory_budget=100 * per_prompt) == 9
    with pytest.raises(ValueError, match="chunk_prompts must be"):
        grad_cached_mlc_backward(model, lambda r, m: mlc_loss(r, m), ids, att, 2, mask, chunk_prompts=0)
    # without dropout, any chunking gives the plain path's gradients
    plain = copy.deepcopy(model)
    loss = mlc_loss(variant_representations(plain, ids, att, 2, mask)[0], mask, impl="torch")
    loss.backward()
    cached = grad_cached_mlc_backward(model, lambda r, m: mlc_loss(r, m, impl="torch"), ids, att, 2, mask)
    torch.testing.assert_close(cached, loss.detach())
    for (name, p), q in zip(model.named_parameters(), plain.parameters(), strict=True):
        if q.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-12, msg=name)


def test_packed_last_index_and_unsupported_attention():
    from mlc_kernels.hf import last_prompt_hidden_packed, packed_last_index

    position_ids = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]])
    assert packed_last_index(position_ids).tolist() == [2, 4, 8]
    with pytest.raises(ValueError, match="must start at 0"):
        packed_last_index(torch.tensor([[1, 2, 0]]))
    model = tiny_model("llama")
    model.config._attn_implementation = "no_such_attention"
    with pytest.raises(ValueError, match="separates packed sequences"):
        last_prompt_hidden_packed(model, torch.ones(1, 9, dtype=torch.long), position_ids, 2)


def test_pack_sequences_left_and_right_padding():
    from mlc_kernels.hf import pack_sequences

    ids = torch.tensor([[5, 6, 7, 0], [0, 0, 8, 9], [3, 0, 0, 0]])
    att = torch.tensor([[1, 1, 1, 0], [0, 0, 1, 1], [1, 0, 0, 0]])
    packed, positions, last = pack_sequences(ids, att)  # rows of twice the longest sequence: one row
    assert packed.tolist() == [[5, 6, 7, 8, 9, 3]]
    assert positions.tolist() == [[0, 1, 2, 0, 1, 0]]
    assert last.tolist() == [[0, 2], [0, 4], [0, 5]]
    packed, positions, last = pack_sequences(ids, att, row_length=3)  # rows of 3 tokens: no room for a filler
    assert packed.tolist() == [[5, 6, 7], [8, 9, 3]]
    assert positions.tolist() == [[0, 1, 2], [0, 1, 0]]
    assert last.tolist() == [[0, 2], [1, 1], [1, 2]]
    packed, positions, last = pack_sequences(ids, att, row_length=4)
    assert packed.tolist() == [[5, 6, 7, 3], [8, 9, 0, 0]] and positions.tolist() == [[0, 1, 2, 0], [0, 1, 0, 1]]
    with pytest.raises(ValueError, match="at least one"):
        pack_sequences(ids, att * torch.tensor([[1], [0], [1]]))


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma"])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_packed_variant_passes_match_padded(family, attention, side):
    """No padding, one row: the block-diagonal mask built from the position ids keeps the variants apart
    (a mask that let them attend across would change every variant after the first)."""
    # eager attention in float64 turns left-padded rows into NaN in transformers itself (its mask overflows
    # to -inf): eager runs in float32 here
    dtype = torch.float64 if attention == "sdpa" else torch.float32
    tol = {"rtol": 1e-6, "atol": 1e-8} if dtype == torch.float64 else {"rtol": 1e-4, "atol": 1e-5}
    model = tiny_model(family, dtype=dtype)
    model.config._attn_implementation = attention
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 64, (2, 3, 9), generator=gen)
    att = torch.ones_like(ids)
    for (i, j), n in zip([(0, 0), (0, 1), (1, 0), (1, 2)], [9, 4, 2, 6], strict=True):
        if side == "right":
            att[i, j, n:] = 0
        else:
            att[i, j, : 9 - n] = 0
    mask = torch.tensor([[True, True, False], [True, True, True]])
    padded, _ = variant_representations(model, ids, att, 2, mask)
    packed, _ = variant_representations(model, ids, att, 2, mask, packed=True)
    torch.testing.assert_close(packed, padded, **tol)  # RoPE tables are fp32
    packed_micro, _ = variant_representations(model, ids, att, 2, mask, packed=True, micro_batch=2)
    torch.testing.assert_close(packed_micro, padded, **tol)
    # the gradient flows through the packed pass like through the padded one
    params = [p for p in model.parameters() if p.requires_grad]
    g_packed = torch.autograd.grad(variant_representations(model, ids, att, 2, mask, packed=True)[0].square().sum(),
                                   params, allow_unused=True)  # fmt: skip
    g_padded = torch.autograd.grad(variant_representations(model, ids, att, 2, mask)[0].square().sum(), params,
                                   allow_unused=True)  # fmt: skip
    for a, b in zip(g_packed, g_padded, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=100 * tol["rtol"], atol=100 * tol["atol"])


@pytest.mark.gpu
def test_packed_batch_matches_padded_with_flash_attention():
    pytest.importorskip("flash_attn")
    from mlc_kernels.hf import last_prompt_hidden_packed

    model = tiny_model("llama", dtype=torch.bfloat16).cuda()
    model.config._attn_implementation = "flash_attention_2"
    ids, att = batch(side="right")
    ids, att = ids.cuda(), att.cuda()
    padded = last_prompt_hidden(model, ids, att, 2)
    lengths = att.sum(1).tolist()
    packed_ids = torch.cat([ids[i, :n] for i, n in enumerate(lengths)])[None]
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None].cuda()
    packed = last_prompt_hidden_packed(model, packed_ids, position_ids, 2)
    torch.testing.assert_close(packed.float(), padded.float(), rtol=2e-2, atol=2e-2)


def test_truncated_pass_completes_inside_a_ddp_wrapper(tmp_path):
    """The truncated forward completes (no exception through DDP's forward), so DDP's reducer is prepared and
    backward through the wrapper gives the unwrapped model's gradients, only for layers <= k."""
    import torch.distributed as dist

    model = tiny_model("llama")
    reference = copy.deepcopy(model)
    ids, att = batch()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        ddp = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
        last_prompt_hidden(ddp, ids, att, 2).square().sum().backward()
        last_prompt_hidden(reference, ids, att, 2).square().sum().backward()
        for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
            if q.grad is None:
                assert p.grad is None or not p.grad.any(), name
            else:
                torch.testing.assert_close(p.grad, q.grad, msg=name)
        assert ddp.module.model.layers[3].self_attn.q_proj.weight.grad is None
    finally:
        dist.destroy_process_group()
