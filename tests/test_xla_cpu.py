"""dydit_jax.xla_cpu: the CPU compile options reach the compiled program, change no model
output, and the opt-out (and U-DiT) keep XLA's defaults."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dydit_jax import xla_cpu
from dydit_jax.models import create_model, model_config


def attention_like(q, k):
    return jax.nn.softmax(jnp.einsum("bqd,bkd->bqk", q, k), axis=-1) @ k


@pytest.fixture
def fresh_options():
    xla_cpu.compiler_options.cache_clear()
    yield
    xla_cpu.compiler_options.cache_clear()


def test_options_reach_the_program_and_keep_values(fresh_options):
    assert jax.default_backend() == "cpu"
    assert xla_cpu.compiler_options() == xla_cpu.OPTIONS  # jaxlib 0.10 accepts the option
    rng = np.random.default_rng(0)
    q, k = (rng.standard_normal((4, 64, 32)).astype(np.float32) for _ in range(2))
    dit = model_config("DiT-S/2", input_size=8, in_channels=4, num_classes=10, depth=2)
    ours = xla_cpu.jit(attention_like, model=dit)
    plain = jax.jit(attention_like)
    assert "ynn" not in ours.lower(q, k).compile().as_text()
    assert "ynn" in plain.lower(q, k).compile().as_text()  # else this test shows nothing
    np.testing.assert_allclose(ours(q, k), plain(q, k), rtol=1e-5, atol=1e-6)
    # a DiT's forward (random adaLN, so that the blocks do something) is the same
    model = create_model("DiT-S/2", input_size=8, in_channels=4, num_classes=10, depth=2,
                         rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    state = jax.tree.map(lambda a: a + 0.02 * jax.random.normal(jax.random.key(1), a.shape),
                         state)
    forward = lambda s, x, t, y: nnx.merge(graphdef, s)(x, t, y)
    x = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
    t, y = np.array([10, 900], np.int32), np.array([1, 7], np.int32)
    np.testing.assert_allclose(xla_cpu.jit(forward, model=dit)(state, x, t, y),
                               jax.jit(forward)(state, x, t, y), rtol=1e-4, atol=1e-5)
    # U-DiT keeps XLA's defaults (its programs compile much longer without the fusions)
    udit = model_config("U-DiT-S", input_size=8, in_channels=4, num_classes=10)
    assert "ynn" in xla_cpu.jit(attention_like, model=udit).lower(q, k).compile().as_text()


def test_opt_out_and_unsupported_option_keep_defaults(fresh_options, monkeypatch):
    monkeypatch.setenv(xla_cpu.OPT_OUT, "1")
    assert xla_cpu.compiler_options() is None
    xla_cpu.compiler_options.cache_clear()
    monkeypatch.delenv(xla_cpu.OPT_OUT)
    # an XLA that does not know the option (it is experimental): no options, no error
    monkeypatch.setattr(xla_cpu, "OPTIONS", {"xla_cpu_no_such_option_anywhere": ""})
    assert xla_cpu.compiler_options() is None
    assert float(xla_cpu.jit(lambda x: x * 2, model=None)(np.float32(3))) == 6.0
