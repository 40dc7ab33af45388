"""The follower in research loops: masked rows, one compile under jit, gradients, meshes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from ssapo_jax import dro, losses


def _pieces():
  return dro.tangent_pieces(6)


@pytest.mark.parametrize("per_atom_cap", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_invalid_rows_take_no_mass_and_no_budget(per_atom_cap):
  """Padding rows (holding NaN) leave the valid rows' answer exactly as without them."""
  rng = np.random.default_rng(0)
  n, pad = 40, 24
  xi = rng.uniform(0.05, 0.95, n)
  slopes, intercepts = _pieces()
  kw = dict(
    epsilon=0.05,
    slopes=slopes,
    intercepts=intercepts,
    support=(0.0, 1.0),
    per_atom_cap=per_atom_cap,
  )
  alone = dro.worst_case(xi, **kw)
  where = np.sort(rng.choice(n + pad, n, replace=False))
  padded_xi = np.full(n + pad, np.nan)
  padded_xi[where] = xi
  valid = np.zeros(n + pad, bool)
  valid[where] = True
  padded = dro.worst_case(padded_xi, valid=valid, **kw)
  np.testing.assert_allclose(padded.atom_weights[where], alone.atom_weights, atol=1e-6)
  np.testing.assert_allclose(padded.atom_shifts[where], alone.atom_shifts, atol=1e-6)
  np.testing.assert_allclose(padded.objective, alone.objective, rtol=1e-6)
  np.testing.assert_allclose(padded.budget_spent, alone.budget_spent, rtol=1e-5)
  # Invalid rows: one atom of weight 1, shift 0 (well-formed for the loss, which masks them).
  np.testing.assert_array_equal(np.asarray(padded.atom_weights)[~valid].sum(1), 1.0)
  np.testing.assert_array_equal(np.asarray(padded.atom_shifts)[~valid], 0.0)
  if per_atom_cap:  # at this ε the cap binds before the budget: padding changes nothing there
    return
  # Without the mask the padding (here at a real value) shares the budget: the answer moves.
  unmasked = dro.worst_case(np.where(valid, padded_xi, 0.5), **kw)
  moved = lambda w: np.asarray(w.atom_weights * w.atom_shifts)  # transport per atom
  assert np.abs(moved(unmasked)[where] - moved(alone)).max() > 1e-3


@pytest.mark.parametrize(
  "grouping, space",
  [
    ("quantile", "margin"),
    pytest.param("chunks", "probability", marks=pytest.mark.slow),
    pytest.param("none", "probability", marks=pytest.mark.slow),
    pytest.param("none", "margin", marks=pytest.mark.slow),
  ],
)
def test_jitted_follower_on_a_padded_batch_equals_eager_on_the_real_rows(grouping, space):
  rng = np.random.default_rng(1)
  n, size = 50, 64
  margins = rng.normal(2, 6, n)
  config = dro.DroConfig(
    epsilon=0.02, margin_scale=0.1, space=space, grouping=grouping, group_size=20
  )
  eager = dro.follower_atoms(margins, config)  # no key: this grouping draws nothing
  padded = np.concatenate([margins, np.full(size - n, np.nan)])
  valid = np.arange(size) < n
  jitted = jax.jit(lambda m, v: dro.follower_atoms(m, config, valid=v))(padded, valid)
  assert jitted.space == space and jitted.margin_scale == 0.1
  np.testing.assert_allclose(jitted.weights[:n], eager.weights, atol=2e-5)
  np.testing.assert_allclose(jitted.shifts[:n], eager.shifts, atol=2e-5)
  losses.check_atoms(jitted)  # padding rows are well-formed too


def test_random_grouping_needs_a_key_and_groups_only_valid_rows():
  config = dro.DroConfig(margin_scale=0.1, grouping="random", group_size=10)
  with pytest.raises(ValueError, match="pass key="):
    dro.solve_follower(np.zeros(5), config)
  valid = np.arange(64) < 35
  xi = jnp.linspace(0.1, 0.9, 64)
  group = jax.jit(lambda v, k: dro.group_ids_on_device(xi, v, config, key=k)[0])
  assert dro.group_ids_on_device(xi, jnp.asarray(valid), config, key=jax.random.key(3))[1] == 7
  ids = group(valid, jax.random.key(3))
  counts = np.bincount(np.asarray(ids)[valid], minlength=7)
  np.testing.assert_array_equal(counts, [10, 10, 10, 5, 0, 0, 0])
  # All rows valid: the same partition as random_groups with the same key.
  ids_all = group(np.ones(64, bool), jax.random.key(3))
  np.testing.assert_array_equal(ids_all, dro.random_groups(64, 10, key=jax.random.key(3)))


def test_jitted_follower_compiles_once_for_a_fixed_batch_shape():
  config = dro.DroConfig(epsilon=0.01, margin_scale=0.1, grouping="random", group_size=16)
  traces = []

  @jax.jit
  def atoms_for(margins, valid, key):
    traces.append(1)
    return dro.follower_atoms(margins, config, valid=valid, key=key)

  rng = np.random.default_rng(2)
  for count in (64, 40, 13, 64, 1):
    margins = rng.normal(0, 5, 64).astype(np.float32)
    atoms = atoms_for(margins, np.arange(64) < count, jax.random.key(count))
    losses.check_atoms(atoms)
  assert len(traces) == 1 and atoms_for._cache_size() == 1


def test_worst_case_gradients_in_epsilon_and_xi():
  """d objective / d ε is the budget's dual; d objective / d ξ matches finite differences."""
  with jax.enable_x64(True):
    rng = np.random.default_rng(4)
    xi = jnp.asarray(rng.uniform(0.1, 0.9, 30))
    slopes, intercepts = _pieces()

    def objective(eps, x):
      return dro.worst_case(
        x, epsilon=eps, slopes=slopes, intercepts=intercepts, support=(0.0, 1.0)
      ).objective

    eps = jnp.asarray(0.03)
    d_eps, d_xi = jax.grad(objective, argnums=(0, 1))(eps, xi)
    dual = dro.worst_case(
      xi, epsilon=eps, slopes=slopes, intercepts=intercepts, support=(0.0, 1.0)
    ).dual[0]
    np.testing.assert_allclose(d_eps, dual, rtol=1e-9)
    h = 1e-6
    fd_eps = (objective(eps + h, xi) - objective(eps - h, xi)) / (2 * h)
    np.testing.assert_allclose(d_eps, fd_eps, rtol=1e-6)
    for i in (0, 7, 19):
      e = jnp.zeros_like(xi).at[i].set(h)
      fd = (objective(eps, xi + e) - objective(eps, xi - e)) / (2 * h)
      np.testing.assert_allclose(d_xi[i], fd, rtol=1e-5, atol=1e-9)
    assert np.all(np.isfinite(d_xi))


# ------------------------------------------------------------------------- meshes


@pytest.fixture(params=[AxisType.Explicit, AxisType.Auto], ids=["explicit", "auto"])
def mesh(request):
  return jax.make_mesh((8,), ("data",), axis_types=(request.param,))


def _logps(n, seed):
  rng = np.random.default_rng(seed)
  return [rng.normal(-50, 10, n).astype(np.float32) for _ in range(4)]


def test_loss_family_on_an_8_device_mesh(mesh):
  """Every loss type (sorting ones included) and the robust loss, batch-sharded, under
  jit on a mesh of either axis type, equal their unsharded values."""
  n = 16
  logps = _logps(n, 5)
  lengths = np.full(n, 7.0, np.float32)
  valid = np.arange(n) < 13
  atoms = losses.LossAtoms(jnp.full((n, 2), 0.5), jnp.asarray([[0.0, 0.05]] * n), margin_scale=0.1)

  def all_losses(pc, pr, rc, rr, lengths, valid, atoms):
    out = {
      name: losses.dpo_loss(
        pc,
        pr,
        rc,
        rr,
        loss_type=name,
        chosen_lengths=lengths,
        rejected_lengths=lengths,
        valid=valid,
      )[0]
      for name in losses.LOSS_TYPES
    }
    out["robust_dpo"] = losses.robust_dpo_loss(pc, pr, rc, rr, atoms, valid=valid)[0]
    return out

  expected = all_losses(*logps, lengths, valid, atoms)
  with jax.set_mesh(mesh):
    row = NamedSharding(mesh, P("data"))
    args = [jax.device_put(a, row) for a in (*logps, lengths, valid)]
    sharded_atoms = jax.device_put(atoms, NamedSharding(mesh, P("data", None)))
    got = jax.jit(all_losses)(*args, sharded_atoms)
  for name, value in expected.items():
    np.testing.assert_allclose(got[name], value, rtol=2e-6, err_msg=name)


@pytest.mark.parametrize(
  "grouping",
  [
    pytest.param("none", marks=pytest.mark.slow),
    pytest.param("quantile", marks=pytest.mark.slow),
    "random",
  ],
)
def test_follower_on_an_8_device_mesh(mesh, grouping):
  n = 64
  margins = np.random.default_rng(6).normal(1, 5, n).astype(np.float32)
  valid = np.arange(n) < 50
  config = dro.DroConfig(epsilon=0.02, margin_scale=0.1, grouping=grouping, group_size=16)
  key = jax.random.key(0)
  expected = dro.follower_atoms(margins, config, valid=valid, key=key)
  with jax.set_mesh(mesh):
    row = NamedSharding(mesh, P("data"))
    got = jax.jit(lambda m, v: dro.follower_atoms(m, config, valid=v, key=key))(
      jax.device_put(margins, row), jax.device_put(valid, row)
    )
  np.testing.assert_allclose(got.weights, expected.weights, atol=1e-6)
  np.testing.assert_allclose(got.shifts, expected.shifts, atol=1e-6)
