"""The sampling relaxations data parallel: their sampled ops run through the branch
convolution (a ``custom_vjp``), whose weight gradient inside ``shard_map`` must be summed over
devices like autodiff's. Two devices must reproduce one device on the same global batch."""
import jax
import numpy as np
import pytest

from dnas.searcher import make_searcher

# both slow (26-45 s and more on 2 cores); the default run checks GDAS across 8 devices on a user
# model (test_nnx.py::test_user_model_eight_devices_equal_one[gdas]) and GDAS+SDARTS-RS
# (test_remedies.py::test_remedies_on_a_user_model_eight_devices_equal_one[gdas+rs])
CASES = [pytest.param("gdas", "nb201", {"channels": 4, "cells_per_stage": 1}, id="gdas", marks=pytest.mark.slow),
         pytest.param("proxyless", "chain", {"width_mult": 0.25, "stage_depths": (1, 1, 1, 1, 1, 1), "stem_stride": 1},
                      id="proxyless", marks=pytest.mark.slow)]  # the chain's compile is slow on 2 cores


@pytest.mark.skipif(jax.local_device_count() < 2, reason="needs 2 (simulated) devices; see tests/conftest.py")
@pytest.mark.parametrize("relaxation,space,opts", CASES)
def test_sampling_relaxation_two_devices_equal_one(relaxation, space, opts, digit_batches):
    (tb, vb), = digit_batches(1, batch=16)
    out = []
    for n in (1, 2):
        s = make_searcher(space, relaxation, space_options={**opts, "in_channels": 1, "num_classes": 10},
                          num_devices=n)
        state, m = s.compiled_step(donate=False)(s.replicate(s.init(jax.random.PRNGKey(0))), s.shard(tb), s.shard(vb))
        out.append((jax.tree_util.tree_map(np.asarray, state.arch), jax.tree_util.tree_map(np.asarray, state.params),
                    float(m["val_loss"])))
    (a1, p1, l1), (a2, p2, l2) = out
    assert abs(l1 - l2) < 1e-5
    for u, v in zip(jax.tree_util.tree_leaves(a1), jax.tree_util.tree_leaves(a2)):
        np.testing.assert_allclose(u, v, atol=1e-6, rtol=0)
    for u, v in zip(jax.tree_util.tree_leaves(p1), jax.tree_util.tree_leaves(p2)):
        np.testing.assert_allclose(u, v, atol=1e-5, rtol=1e-4)
