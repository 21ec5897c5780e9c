"""The parity test, on every architecture: a prefix equal to the frozen
model's own key/values for tokens ``p`` makes it behave exactly as on ``p + x``."""

import pytest
import torch
from tiny import assert_same, ARCHS, EAGER_ONLY, tiny_model, tokens

from prefixtune import PrefixConfig, PrefixModel
from prefixtune.attention import AttentionPolicy

L_P = 4


def _wrap_with_own_kv(model, p, name="default", attention="auto"):
    pm = PrefixModel.wrap(model, PrefixConfig(prefix_length=L_P, reparameterize=False), name=name, attention=attention)
    pm.set_prefix_key_values(pm.key_values_for_tokens(p), name=name)
    return pm


def _plain_logits(model, p, x, mask=None, positions=None):
    full = torch.cat([p.expand(x.shape[0], -1), x], dim=1)
    if mask is not None:
        mask = torch.cat([torch.ones(x.shape[0], p.shape[0], dtype=mask.dtype), mask], dim=1)
    with torch.no_grad():
        return model(input_ids=full, attention_mask=mask, position_ids=positions).logits[:, p.shape[0]:]


@pytest.mark.parametrize("arch", ARCHS)
def test_prefix_of_own_key_values_equals_reading_the_tokens(arch):
    model = tiny_model(arch)
    p, x = tokens(1, L_P, seed=1)[0], tokens(3, 9, seed=2)
    expected = _plain_logits(model, p, x)
    pm = _wrap_with_own_kv(model, p)
    with torch.no_grad():
        got = pm(input_ids=x).logits
    assert_same(got, expected)


ROUTES = {
    "pad": AttentionPolicy(pad_free_rows={"cpu": None}),  # pad wherever it fits, as on CUDA
    "grouped": AttentionPolicy(),  # the default on the CPU for rows this short
    "stock": AttentionPolicy("mask"),
}


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("arch", ARCHS)
def test_parity_holds_on_each_kernel_route(arch, route):
    """Every route a causal call can take gives the same logits; each is chosen here through the
    public policy, and the call's record says it was taken."""
    model = tiny_model(arch)
    p, x = tokens(1, L_P, seed=1)[0], tokens(3, 9, seed=2)
    expected = _plain_logits(model, p, x)
    pm = _wrap_with_own_kv(model, p, attention=ROUTES[route])
    batch = pm.prefix_batch("default", 3)
    with torch.no_grad():
        got = pm(input_ids=x, prefix=batch).logits
    assert_same(got, expected)
    plain_kernel = arch not in EAGER_ONLY  # Gemma 2's soft-capping lives in its own eager kernel
    assert set(batch.routes.values()) == {route if plain_kernel else "stock"}


@pytest.mark.parametrize("device, q_len, extra, masked, route", [
    ("cpu", 128, 10, False, "grouped"), ("cpu", 384, 10, False, "grouped"), ("cpu", 512, 50, False, "pad"),
    ("cpu", 512, 200, False, "grouped"), ("cpu", 1024, 200, False, "pad"), ("cpu", 1024, 10, True, "grouped"),
    ("cuda", 128, 10, False, "pad"), ("cuda", 256, 200, False, "pad"), ("cuda", 128, 200, False, "stock"),
    ("cuda", 128, 10, True, "stock"), ("cpu", 1, 10, False, "stock"),
])
def test_auto_routes_each_call_by_its_device_length_and_padding(device, q_len, extra, masked, route):
    policy = AttentionPolicy()
    assert policy.route("sdpa", device, q_len, extra, causal=True, masked=masked, grouped_heads=True,
                        plain=True) == route
    assert policy.route("eager", device, q_len, extra, causal=True, masked=masked, grouped_heads=True,
                        plain=True) == "stock"
    assert AttentionPolicy("mask").route("sdpa", device, q_len, extra, causal=True, masked=masked,
                                         grouped_heads=True, plain=True) == "stock"


def test_an_unknown_attention_mode_is_refused_by_name():
    with pytest.raises(ValueError, match="attention='flash'.*auto, mask"):
        PrefixModel(tiny_model("llama"), attention="flash")


EAGER_TOO = [(arch, "eager") for arch in ("llama", "gpt2", "opt", "qwen3")]


@pytest.mark.parametrize("arch, attn", [(arch, None) for arch in ARCHS] + EAGER_TOO)
def test_parity_holds_with_right_padding(arch, attn):
    model = tiny_model(arch, attn=attn)
    p, x = tokens(1, L_P, seed=1)[0], tokens(3, 8, seed=3)
    mask = torch.ones_like(x)
    mask[1, 5:] = 0
    mask[2, 2:] = 0
    expected = _plain_logits(model, p, x, mask)
    pm = _wrap_with_own_kv(model, p)
    with torch.no_grad():
        got = pm(input_ids=x, attention_mask=mask).logits
    keep = mask.bool()
    assert_same(got[keep], expected[keep])


@pytest.mark.parametrize("route", ["pad", "grouped"])
@pytest.mark.parametrize("padded", [False, True])
def test_prefix_gradients_are_the_same_on_every_route(route, padded):
    """The routes differ in kernels and copies, not in what training sees: the loss and the prefix
    gradients of each equal the stock route's."""
    x = tokens(3, 12, seed=5)
    mask = torch.ones_like(x)
    if padded:
        mask[1, 8:] = 0
        mask[2, 5:] = 0
    got = {}
    for name in (route, "stock"):
        torch.manual_seed(0)
        pm = PrefixModel.wrap(tiny_model("llama"), PrefixConfig(prefix_length=4, init_std=1.0),
                              attention=ROUTES[name])
        loss = pm(input_ids=x, attention_mask=mask, labels=x, return_logits=False).loss
        loss.backward()
        got[name] = loss.detach(), torch.cat([p.grad.flatten() for p in pm.trainable_parameters()])
    assert_same(got[route][0], got["stock"][0])
    torch.testing.assert_close(got[route][1], got["stock"][1], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("route", ["pad", "grouped"])
def test_fused_routes_run_under_bf16_autocast_and_agree_with_the_stock_kernel(route):
    """torch's bias object bypasses autocast's casts inside SDPA; the float32 query and keys and
    the bf16 values that autocast leaves them with must still meet in one dtype."""
    x = tokens(2, 9, seed=5)
    outs = {}
    for name in (route, "stock"):
        torch.manual_seed(0)
        pm = PrefixModel.wrap(tiny_model("llama"), PrefixConfig(prefix_length=3, init_std=1.0),
                              attention=ROUTES[name])
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            outs[name] = pm(input_ids=x).logits.float()
    torch.testing.assert_close(outs[route], outs["stock"], atol=0.05, rtol=0.05)


@pytest.mark.parametrize("mode, route", [("auto", "grouped"), ("mask", "stock")])
def test_padded_calls_keep_grouped_heads_on_the_cpu_unless_mask_is_chosen(mode, route):
    """On the CPU a masked call goes to torch's SDPA with grouped heads (no per-head key/value
    copies); ``"mask"`` keeps transformers' stock path, so the two stay comparable."""
    model = tiny_model("llama")  # 4 query heads over 2 key/value heads
    p, x = tokens(1, L_P, seed=1)[0], tokens(3, 8, seed=3)
    mask = torch.ones_like(x)
    mask[1, 5:] = 0
    expected = _plain_logits(model, p, x, mask)
    pm = _wrap_with_own_kv(model, p, attention=mode)
    batch = pm.prefix_batch("default", 3)
    with torch.no_grad():
        got = pm(input_ids=x, attention_mask=mask, prefix=batch).logits
    assert_same(got[mask.bool()], expected[mask.bool()])
    assert set(batch.routes.values()) == {route}


@pytest.mark.parametrize("arch", ARCHS)
def test_parity_holds_with_left_padding_and_mask_positions(arch):
    model = tiny_model(arch)
    p, x = tokens(1, L_P, seed=1)[0], tokens(2, 7, seed=4)
    mask = torch.ones_like(x)
    mask[1, :3] = 0  # row 1 is left-padded
    # the plain model reads [pads, p, real tokens]: the pads stay in front of p
    full = torch.cat([x[:, :3], p.expand(2, -1), x[:, 3:]], dim=1)
    full[0] = torch.cat([p, x[0]])  # row 0 has no padding
    full_mask = torch.ones_like(full)
    full_mask[1, :3] = 0
    with torch.no_grad():
        plain = model(input_ids=full, attention_mask=full_mask, position_ids=(full_mask.cumsum(-1) - 1).clamp(min=0))
    expected = [plain.logits[0, L_P:], plain.logits[1, 3 + L_P:]]
    pm = _wrap_with_own_kv(model, p)
    with torch.no_grad():
        got = pm(input_ids=x, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
    assert_same(got[0], expected[0])
    assert_same(got[1, 3:], expected[1])


@pytest.mark.parametrize("arch", ARCHS)
def test_mixed_prefix_batch_equals_one_prefix_runs_row_by_row(arch):
    model = tiny_model(arch)
    pm = PrefixModel.wrap(model, PrefixConfig(prefix_length=3, reparameterize=False, init_std=1.0), name="a")
    pm.add_prefix("b", PrefixConfig(prefix_length=6, reparameterize=True, reparam_hidden_size=16))
    pm.add_prefix("c", PrefixConfig(prefix_length=2, reparameterize=False, init_std=1.0, layers=(1,)))
    x = tokens(4, 7, seed=6)
    mask = torch.ones_like(x)
    mask[2, 5:] = 0
    names = ["a", None, "b", "c"]
    with torch.no_grad():
        mixed = pm(input_ids=x, attention_mask=mask, prefix=names).logits
        for row, name in enumerate(names):
            alone = pm(input_ids=x[row:row + 1], attention_mask=mask[row:row + 1], prefix=name).logits
            keep = mask[row].bool()
            assert_same(mixed[row][keep], alone[0][keep])
        base = model(input_ids=x[1:2]).logits
    assert_same(mixed[1], base[0])


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_mixed_prefixes_of_one_length_need_no_mask_and_equal_one_prefix_runs(arch):
    """Rows with different prefixes of the same length fill every slot: no mask is built (the
    mask-free attention path), and each row still equals its one-prefix run."""
    pm = PrefixModel.wrap(tiny_model(arch), PrefixConfig(prefix_length=3, reparameterize=False, init_std=1.0), name="a")
    pm.add_prefix("b", PrefixConfig(prefix_length=3, reparameterize=False, init_std=1.0))
    names = ["b", "a", "b"]
    assert all(v is None for v in pm.prefix_batch(names, 3).valid)
    pm.add_prefix("c", PrefixConfig(prefix_length=3, reparameterize=False, layers=(1,)))
    assert pm.prefix_batch(["a", "c"], 2).valid[0] is not None  # "c" has no slots in layer 0
    x = tokens(3, 7, seed=6)
    with torch.no_grad():
        mixed = pm(input_ids=x, prefix=names).logits
        for row, name in enumerate(names):
            assert_same(mixed[row], pm(input_ids=x[row:row + 1], prefix=name).logits[0])


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_prefix_none_for_every_row_is_exactly_the_base_model(arch):
    model = tiny_model(arch)
    x = tokens(2, 6, seed=7)
    with torch.no_grad():
        base = model(input_ids=x).logits
        pm = PrefixModel.wrap(model, PrefixConfig(prefix_length=3))
        assert torch.equal(pm(input_ids=x, prefix=None).logits, base)
        assert torch.equal(pm(input_ids=x, prefix=[None, None]).logits, base)


def test_shift_positions_false_keeps_the_real_tokens_at_zero():
    model = tiny_model("llama")
    pm = PrefixModel.wrap(model, PrefixConfig(prefix_length=L_P, reparameterize=False, init_std=1.0), name="shifted")
    pm.add_prefix("plain", PrefixConfig(prefix_length=L_P, reparameterize=False, shift_positions=False))
    pm.set_prefix_key_values(pm.prefix_key_values("shifted"), name="plain")  # same K/V, keeps shift_positions
    assert pm.prefixes["plain"].config.shift_positions is False
    x = tokens(2, 6, seed=8)
    with torch.no_grad():
        unshifted = pm(input_ids=x, prefix="plain").logits
        shifted = pm(input_ids=x, prefix="shifted").logits
        # the shifted prefix given positions -L_p.. lands on 0..: the same computation
        moved = pm(input_ids=x, prefix="shifted", position_ids=torch.arange(6)[None] - L_P).logits
    assert_same(unshifted, moved)
    assert not torch.allclose(unshifted, shifted, atol=1e-3)


def test_rows_that_share_a_shift_keep_one_row_of_positions():
    """Every row shifted alike: the positions stay ``[1, T]``, as the base model makes them;
    rows shifted differently get ``[B, T]``. Both are exact: the mixed-batch tests above compare
    them with row-by-row runs."""
    config = dict(reparameterize=False, init_std=1.0)
    pm = PrefixModel.wrap(tiny_model("llama"), PrefixConfig(prefix_length=3, **config), name="a")
    pm.add_prefix("b", PrefixConfig(prefix_length=3, **config))
    pm.add_prefix("short", PrefixConfig(prefix_length=2, **config))
    seen = []
    pm.model.model.rotary_emb.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(tuple(kwargs["position_ids"].shape)), with_kwargs=True)
    x = tokens(3, 5, seed=9)
    with torch.no_grad():
        for prefix in ("a", ["a", "b", "a"], ["a", "short", "a"], ["a", None, "a"]):
            pm(input_ids=x, prefix=prefix)
        one_row = pm(input_ids=x, prefix="a").logits
        per_row = pm(input_ids=x, prefix="a", position_ids=torch.arange(5).expand(3, 5)).logits  # caller's [B, T]
    assert seen == [(1, 5), (1, 5), (3, 5), (3, 5), (1, 5), (3, 5)]
    assert_same(one_row, per_row)
