"""ssapo_jax: Stackelberg Self-Annotated Preference Optimization in JAX/Flax."""

from ssapo_jax.annotate import implicit_reward, select_pairs, SelectedPairs
from ssapo_jax.batch import PreferenceBatch, make_preference_batch
from ssapo_jax.losses import dpo_loss, robust_dpo_loss, sequence_logps, LOSS_TYPES

__version__ = "0.1.0"
