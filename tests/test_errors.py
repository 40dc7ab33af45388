"""Tests for ssapo_jax/errors.py: one exit status per class of problem, and their messages."""

from __future__ import annotations

import pytest

from ssapo_jax import errors


def test_exit_code_table_and_builtin_bases():
  assert errors.EXIT_CODES == {
    "ConfigError": 2,
    "DataError": 3,
    "RunDirError": 4,
    "CheckpointError": 5,
    "NonFiniteError": 6,
  }
  # The classes the modules raise are these, so `except ValueError` keeps working.
  from ssapo_jax.config import ConfigError
  from ssapo_jax.data import DataValidationError
  from ssapo_jax.models import CheckpointError
  from ssapo_jax.runlock import RunLockedError

  assert ConfigError is errors.ConfigError and CheckpointError is errors.CheckpointError
  assert issubclass(DataValidationError, errors.DataError) and issubclass(
    DataValidationError, ValueError
  )
  assert issubclass(RunLockedError, errors.RunDirError)
  assert issubclass(errors.NonFiniteError, RuntimeError)


def test_non_finite_advice_names_causes_in_order():
  from ssapo_jax import train as tr

  config = tr.TrainConfig(max_nonfinite_steps=2)
  tr.check_finite_progress({"nonfinite/consecutive": 1.0, "nonfinite/total": 1.0}, config)
  with pytest.raises(errors.NonFiniteError) as e:
    tr.check_finite_progress({"nonfinite/consecutive": 2.0, "nonfinite/total": 3.0}, config)
  message = str(e.value)
  assert "2 consecutive" in message and "3 skipped in total" in message
  causes = [
    message.index(c)
    for c in ("corrupted inputs", "restored checkpoint", "train.learning_rate", "compute_dtype")
  ]
  assert causes == sorted(causes)
