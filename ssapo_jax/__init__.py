"""ssapo_jax: Stackelberg Self-Annotated Preference Optimization in JAX/Flax.

``__all__`` is the public API (``dir(ssapo_jax)`` lists exactly it); everything else lives in
the submodules (``ssapo_jax.dro.summarize``, ``ssapo_jax.pipeline.run.run``, ...). Every name is
re-exported lazily (imported on first access), so ``import ssapo_jax`` does not import JAX: the
command-line tools print their first line before JAX loads.
"""

import importlib as _importlib

__version__ = "0.1.0"

# name -> module that defines it, imported on first access.
_LAZY = {
  # Losses.
  **dict.fromkeys(
    (
      "LOSS_TYPES",
      "LossAtoms",
      "check_atoms",
      "dpo_loss",
      "f_divergence_scores",
      "pair_logps",
      "robust_dpo_loss",
      "sequence_logps",
    ),
    "ssapo_jax.losses",
  ),
  # Self-annotation.
  **dict.fromkeys(
    ("SelectedPairs", "agreement_rate", "implicit_reward", "select_pairs"), "ssapo_jax.annotate"
  ),
  # The follower.
  **dict.fromkeys(
    (
      "DroConfig",
      "WorstCase",
      "chunk_groups",
      "follower_atoms",
      "group_ids_on_device",
      "margins_to_xi",
      "quantile_groups",
      "random_groups",
      "solve_follower",
      "tangent_pieces",
      "to_loss_atoms",
      "worst_case",
    ),
    "ssapo_jax.dro",
  ),
  # Preference batches.
  **dict.fromkeys(("PreferenceBatch", "concat_pairs", "make_preference_batch"), "ssapo_jax.batch"),
  # Models, sampling, sharding, training, data, configs, checkpoints, metrics.
  **dict.fromkeys(
    ("CausalLM", "Llama", "LlamaConfig", "load_hf", "save_hf", "logical_axes", "CheckpointError"),
    "ssapo_jax.models",
  ),
  **dict.fromkeys(
    ("generate", "Generation", "SamplingConfig", "Sampler", "gather_samples"), "ssapo_jax.sampling"
  ),
  **dict.fromkeys(
    (
      "MeshConfig",
      "make_mesh",
      "initialize_distributed",
      "global_batch",
      "host_batch_rows",
      "LOGICAL_AXIS_RULES",
    ),
    "ssapo_jax.sharding",
  ),
  **dict.fromkeys(
    (
      "TrainConfig",
      "TrainState",
      "create_train_state",
      "make_train_step",
      "train_step",
      "make_compute_logps",
      "compute_logps",
      "cached_pair_logps",
      "merge_params",
      "check_finite_progress",
      "NonFiniteError",
      "Scorer",
    ),
    "ssapo_jax.train",
  ),
  **dict.fromkeys(
    (
      "DataConfig",
      "DataValidationError",
      "load_preferences",
      "load_prompts",
      "tokenize_pairs",
      "PreferenceLoader",
      "LoaderCursor",
      "split_rows",
      "save_round",
      "load_round",
    ),
    "ssapo_jax.data",
  ),
  **dict.fromkeys(("ConfigError", "load_config", "save_resolved"), "ssapo_jax.config"),
  **dict.fromkeys(
    ("ExperimentConfig", "ModelConfig", "RoundsConfig", "load_experiment", "stream_key"),
    "ssapo_jax.experiment",
  ),
  **dict.fromkeys(("Checkpointer", "CheckpointConfig"), "ssapo_jax.checkpoint"),
  "MetricsLogger": "ssapo_jax.metrics",
}

__all__ = list(_LAZY)


def __getattr__(name):
  if name in _LAZY:
    value = getattr(_importlib.import_module(_LAZY[name]), name)
    globals()[name] = value  # cached: later look-ups (and pdoc) see a plain attribute
    return value
  raise AttributeError(f"module 'ssapo_jax' has no attribute {name!r}")


def __dir__():
  return sorted(__all__)
