"""Class embedder, condition dropout, byte tokenizer and the from-scratch text transformer,
checked against closed forms, Python's own UTF-8 codec and a float64 NumPy re-implementation."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import erf

from ldm_jax.models.conditioning import ClassEmbedder, TextTransformer, drop_labels, drop_to_null
from ldm_jax.models.tokenizers import ByteTokenizer

# --------------------------------------------------------------------------------------------
# Byte tokenizer


def test_byte_tokenizer_round_trip_and_layout():
    tok = ByteTokenizer(max_length=32)
    texts = ["a cat", "", "Straße 東京 🤖", "tab\tnew\nline"]
    out = tok(texts)
    assert out.ids.dtype == np.int32 and out.ids.shape == (4, 32) and out.mask.dtype == bool
    for row, mask, text in zip(out.ids, out.mask, texts):
        data = text.encode("utf-8")
        n = len(data) + 2
        assert row[0] == tok.bos_id and row[n - 1] == tok.eos_id
        np.testing.assert_array_equal(row[1 : n - 1], np.frombuffer(data, np.uint8).astype(np.int32) + 3)
        assert (row[n:] == tok.pad_id).all()
        np.testing.assert_array_equal(mask, np.arange(32) < n)
        assert tok.decode(row) == text
    # Empty string: BOS, EOS only (the classifier-free-guidance input).
    assert out.ids[1, :3].tolist() == [1, 2, 0] and out.mask[1].sum() == 2
    # Deterministic and batch-independent.
    np.testing.assert_array_equal(tok(["a cat"]).ids[0], out.ids[0])
    np.testing.assert_array_equal(tok("a cat").ids, tok("a cat").ids)


def test_byte_tokenizer_truncates_at_character_boundary():
    tok = ByteTokenizer(max_length=8)  # room for 6 bytes
    ascii_ids = tok("abcdefghij").ids[0]
    assert tok.decode(ascii_ids) == "abcdef" and ascii_ids[-1] == tok.eos_id
    # "ab" + two 3-byte characters = 8 bytes; the second character does not fit whole.
    ids = tok("ab東京").ids[0]
    assert tok.decode(ids) == "ab東" and ids.tolist()[:6] == [1, 0x61 + 3, 0x62 + 3, 0xE6 + 3, 0x9D + 3, 0xB1 + 3]
    assert ids[5 + 1] == tok.eos_id and ids[7] == tok.pad_id
    with pytest.raises(ValueError, match="1"):
        ByteTokenizer(max_length=1)
    with pytest.raises(ValueError, match="3"):
        tok(["ok", 3])


# --------------------------------------------------------------------------------------------
# Class embedder and condition dropout


def test_class_embedder_null_label_and_shapes():
    module = ClassEmbedder(num_classes=10, embed_dim=16)
    labels = jnp.array([0, 3, 10, 9])
    params = module.init(jax.random.key(0), labels)["params"]
    table = nn.unbox(params)["embedding"]["embedding"]
    assert table.shape == (11, 16)  # the extra row is the null label
    assert module.null_label == 10
    out = module.apply({"params": params}, labels)
    assert out.shape == (4, 16)
    np.testing.assert_array_equal(out, np.asarray(table)[[0, 3, 10, 9]])
    ctx = module.apply({"params": params}, labels, as_context=True)
    assert ctx.shape == (4, 1, 16)
    np.testing.assert_array_equal(ctx[:, 0], out)
    assert float(jnp.std(table)) == pytest.approx(1.0, abs=0.15)  # torch.nn.Embedding's N(0, 1)
    leaf = params["embedding"]["embedding"]
    assert isinstance(leaf, nn.LogicallyPartitioned) and leaf.names == ("vocab", "embed")


def test_drop_labels_rate_statistics():
    n, p, null = 200_000, 0.1, 1000
    labels = jnp.asarray(np.random.default_rng(0).integers(0, null, n))
    dropped = np.asarray(jax.jit(drop_labels, static_argnums=(2, 3))(labels, jax.random.key(1), p, null))
    is_null = dropped == null
    # Binomial(n, p): the observed count is within 5 standard deviations of n p.
    assert abs(is_null.sum() - n * p) < 5 * math.sqrt(n * p * (1 - p))
    np.testing.assert_array_equal(dropped[~is_null], np.asarray(labels)[~is_null])
    # Different keys drop different rows; p = 0 and p = 1 are exact.
    other = np.asarray(drop_labels(labels, jax.random.key(2), p, null)) == null
    assert (other != is_null).any()
    np.testing.assert_array_equal(drop_labels(labels, jax.random.key(1), 0.0, null), labels)
    assert (np.asarray(drop_labels(labels, jax.random.key(1), 1.0, null)) == null).all()
    with pytest.raises(ValueError, match="1.5"):
        drop_labels(labels, jax.random.key(1), 1.5, null)


def test_drop_to_null_replaces_whole_rows():
    ids = jnp.arange(6 * 4).reshape(6, 4) + 10
    null = jnp.array([1, 2, 0, 0])
    out = np.asarray(drop_to_null(ids, jax.random.key(0), 0.5, null))
    dropped = (out == np.asarray(null)).all(axis=1)
    assert dropped.any() and not dropped.all()  # key 0 at p=0.5 drops some but not all of 6 rows
    np.testing.assert_array_equal(out[~dropped], np.asarray(ids)[~dropped])


# --------------------------------------------------------------------------------------------
# Text transformer

WIDTH, DEPTH, HEADS, LENGTH = 32, 2, 4, 24


@pytest.fixture(scope="module")
def text_model():
    module = TextTransformer(max_length=LENGTH, width=WIDTH, depth=DEPTH, num_heads=HEADS)
    tok = ByteTokenizer(max_length=LENGTH)
    batch = tok(["a red cube", "", "a much longer prompt that is cut"])
    params = jax.jit(module.init)(jax.random.key(0), jnp.asarray(batch.ids), jnp.asarray(batch.mask))["params"]
    # Non-trivial norms so the reference check exercises them.
    params = jax.tree.map(lambda x: x, nn.unbox(params))
    rng = np.random.default_rng(0)
    for path in ("final_layer_norm", "encoder/layers_0/layer_norm1", "encoder/layers_1/layer_norm2"):
        node = params
        for name in path.split("/"):
            node = node[name]
        node["scale"] = jnp.asarray(1 + 0.2 * rng.standard_normal(WIDTH), jnp.float32)
        node["bias"] = jnp.asarray(0.1 * rng.standard_normal(WIDTH), jnp.float32)
    apply = jax.jit(lambda p, ids, mask: module.apply({"params": p}, ids, mask))
    return module, params, batch, apply


def _layer_norm(x, p, eps=1e-5):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def _dense(x, p):
    return x @ p["kernel"] + p["bias"]


def _reference_forward(params, ids, mask):
    """float64 NumPy: embeddings, pre-LN layers with key-padding-masked softmax attention and an
    exact-erf GELU MLP, final LayerNorm."""
    p = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
    x = p["embeddings"]["token_embedding"]["embedding"][ids] + p["embeddings"]["position_embedding"]["embedding"][
        None, : ids.shape[1]
    ]
    b, l, d = x.shape
    hd = d // HEADS
    for i in range(DEPTH):
        layer = p["encoder"][f"layers_{i}"]
        h = _layer_norm(x, layer["layer_norm1"])
        att = layer["self_attn"]
        split = lambda t: t.reshape(b, l, HEADS, hd).transpose(0, 2, 1, 3)  # noqa: E731
        q, k, v = (split(_dense(h, att[n])) for n in ("q_proj", "k_proj", "v_proj"))
        logits = q @ k.transpose(0, 1, 3, 2) / math.sqrt(hd)
        logits = np.where(mask[:, None, None, :], logits, -np.inf)
        w = np.exp(logits - logits.max(-1, keepdims=True))
        w = w / w.sum(-1, keepdims=True)
        o = (w @ v).transpose(0, 2, 1, 3).reshape(b, l, d)
        x = x + _dense(o, att["out_proj"])
        h = _layer_norm(x, layer["layer_norm2"])
        h = _dense(h, layer["mlp"]["fc1"])
        h = 0.5 * h * (1 + erf(h / math.sqrt(2)))
        x = x + _dense(h, layer["mlp"]["fc2"])
    return _layer_norm(x, p["final_layer_norm"])


def test_text_transformer_matches_float64_reference(text_model):
    module, params, batch, apply = text_model
    out = np.asarray(apply(params, jnp.asarray(batch.ids), jnp.asarray(batch.mask)), np.float64)
    ref = _reference_forward(params, batch.ids, batch.mask)
    assert out.shape == (3, LENGTH, WIDTH)
    err = np.abs(out - ref)[batch.mask].max() / np.abs(ref[batch.mask]).max()
    print(f"text transformer vs float64 reference: normalized max error {err:.2e}")
    assert err <= 1e-5


def test_text_transformer_ignores_padding(text_model):
    module, params, batch, apply = text_model
    ids = jnp.asarray(batch.ids)
    mask = jnp.asarray(batch.mask)
    scrambled = jnp.where(mask, ids, jax.random.randint(jax.random.key(3), ids.shape, 3, 259))
    assert (scrambled != ids).any()
    a = np.asarray(apply(params, ids, mask))
    b = np.asarray(apply(params, scrambled, mask))
    np.testing.assert_allclose(a[batch.mask], b[batch.mask], rtol=0, atol=1e-6)
    # Without the mask the padding does leak in, so the check above is not vacuous.
    c = np.asarray(apply(params, scrambled, jnp.ones_like(mask)))
    assert np.abs(c[batch.mask] - a[batch.mask]).max() > 1e-3


def test_text_transformer_bf16_under_jit(text_model):
    module, params, batch, apply = text_model
    bf16 = TextTransformer(max_length=LENGTH, width=WIDTH, depth=DEPTH, num_heads=HEADS, dtype=jnp.bfloat16)
    out = jax.jit(lambda p, i, m: bf16.apply({"params": p}, i, m))(params, jnp.asarray(batch.ids), jnp.asarray(batch.mask))
    assert out.dtype == jnp.bfloat16
    ref = np.asarray(apply(params, jnp.asarray(batch.ids), jnp.asarray(batch.mask)))
    out = np.asarray(out, np.float32)
    assert np.isfinite(out).all()
    err = np.abs(out - ref)[batch.mask].max() / np.abs(ref[batch.mask]).max()
    print(f"bf16 compute vs float32: normalized max error {err:.2e}")
    assert err < 5e-2


def test_conditioning_params_carry_logical_axis_names():
    ids = jnp.zeros((1, 8), jnp.int32)
    trees = [
        jax.eval_shape(TextTransformer(max_length=8, width=16, depth=2, num_heads=2).init, jax.random.key(0), ids),
        jax.eval_shape(ClassEmbedder(5, 8).init, jax.random.key(0), jnp.zeros((2,), jnp.int32)),
    ]
    count = 0
    for tree in trees:
        for leaf in jax.tree.leaves(tree["params"], is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned)):
            assert isinstance(leaf, nn.LogicallyPartitioned), leaf
            assert len(leaf.names) == leaf.value.ndim
            count += 1
    assert count == 2 + 2 * 16 + 2 + 1


def test_text_transformer_rejects_bad_shapes():
    module = TextTransformer(max_length=8, width=16, depth=1, num_heads=2)
    with pytest.raises(ValueError, match="9"):
        module.init(jax.random.key(0), jnp.zeros((1, 9), jnp.int32))
    with pytest.raises(ValueError, match="15"):
        TextTransformer(width=15, num_heads=2).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
