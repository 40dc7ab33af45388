"""The leader's update: the pure sharded train step (`step`) and batched log-prob scoring
(`scoring`). Everything public in both is re-exported here (``from ssapo_jax import train``)."""

from ssapo_jax.train.scoring import (
                                     Scorer,
                                     compute_logps,
                                     data_fingerprint,
                                     gather_batches,
                                     make_compute_logps,
                                     make_compute_packed_logps,
                                     params_fingerprint,
                                     precompute_ref_logps,
                                     scoring_batch_size,
)
from ssapo_jax.train.step import (
                                     DTYPES,
                                     OBJECTIVES,
                                     REFERENCE_MODES,
                                     SCHEDULES,
                                     Metrics,
                                     NonFiniteError,
                                     TrainConfig,
                                     TrainState,
                                     batch_shardings,
                                     check_finite_progress,
                                     create_train_state,
                                     init_train_state,
                                     make_optimizer,
                                     make_schedule,
                                     make_train_step,
                                     merge_params,
                                     packed_batch_shardings,
                                     packed_row_multiple,
                                     param_shardings,
                                     split_model,
                                     state_shardings,
                                     train_step,
)

__all__ = [
    "DTYPES", "Metrics", "NonFiniteError", "OBJECTIVES", "REFERENCE_MODES", "SCHEDULES", "Scorer",
    "TrainConfig", "TrainState", "init_train_state", "batch_shardings", "check_finite_progress", "compute_logps",
    "create_train_state", "data_fingerprint", "gather_batches", "make_compute_logps",
    "make_optimizer", "make_schedule", "make_train_step", "merge_params", "params_fingerprint",
    "make_compute_packed_logps", "packed_batch_shardings", "packed_row_multiple",
    "precompute_ref_logps", "param_shardings", "scoring_batch_size", "split_model", "state_shardings", "train_step",
]
