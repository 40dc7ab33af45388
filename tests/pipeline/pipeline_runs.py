"""What the subprocess tests of the pipeline share: the tiny run's config, the `ssapo-train`
command and environment, and readers of a finished run's outputs."""

import json
import os
import sys

from safetensors.numpy import load_file

from ssapo_jax.testing import write_tiny_model, write_tiny_preferences

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CONFIG = """\
output_dir: {out}
seed: 0
model: {{path: {world}/model}}
data: {{source: {world}/prefs.jsonl, max_length: 64, max_prompt_length: 32, bucket_size: 16,
        seed_size: 32, pool_sizes: [32, 32]}}
sampling: {{temperature: 0.7, max_new_tokens: 8, num_samples: 2, batch_size: 16}}
train: {{beta: 0.1, learning_rate: 1.0e-3, global_batch_size: 8,
         compute_dtype: float32, remat: none}}
dro: {{epsilon: 0.05}}
rounds: {{num_rounds: 2, num_eval_prompts: 8, follower_refresh_steps: 2}}
checkpoint: {{save_every_steps: 2, keep: 3}}
"""


def write_world(root: str) -> str:
  """The tiny model and 200 preference pairs every run reads; returns ``root``."""
  write_tiny_model(os.path.join(root, "model"))
  write_tiny_preferences(os.path.join(root, "prefs.jsonl"), 200)
  return root


def write_config(world: str, out: str, folder: str, extra: str = "") -> str:
  """The run's YAML (``CONFIG`` plus ``extra`` lines) in ``folder``, named after ``out``."""
  path = os.path.join(folder, f"{os.path.basename(out)}.yaml")
  with open(path, "w") as f:
    f.write(CONFIG.format(out=out, world=world) + extra)
  return path


def env(devices: int) -> dict:
  """The environment of a run on ``devices`` simulated CPU devices."""
  return dict(
    os.environ,
    XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
    JAX_PLATFORMS="cpu",
    PYTHONUNBUFFERED="1",
    TQDM_DISABLE="1",
  )


def command(config: str, *overrides: str) -> list[str]:
  """The ``ssapo-train`` command line (through ``launch/train.py``)."""
  return [sys.executable, os.path.join(REPO, "launch", "train.py"), config, *overrides]


def final_params(out: str) -> dict:
  return load_file(os.path.join(out, "final_policy", "model.safetensors"))


def losses(out: str) -> list:
  """``(step, loss)`` of every train record in ``metrics.jsonl``."""
  with open(os.path.join(out, "metrics.jsonl")) as f:
    return [(r["step"], r["loss"]) for r in map(json.loads, f) if "loss" in r]
