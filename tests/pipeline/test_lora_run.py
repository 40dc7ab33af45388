"""A 2-round SSAPO run with LoRA (``model.lora``) through ``ssapo-train`` on the tiny model
(slow: real subprocesses, several minutes):

* killed by SIGKILL during round 1's training and relaunched, it ends bitwise equal to the
  uninterrupted LoRA run;
* each round exports the merged policy and its adapters in PEFT format: PEFT applied to the
  previous round's policy gives this round's policy logits (1e-4).
"""

import os

import numpy as np
import pytest
from pipeline_runs import final_params, losses, write_config, write_world
from test_run import _has_train_checkpoint, _kill_when, _run

LORA = """\
model: {{path: {world}/model, lora: {{rank: 4, alpha: 8.0}}}}
"""

pytestmark = pytest.mark.slow


def _lora_config(world, out, folder) -> str:
  path = write_config(world, out, folder)
  text = open(path).read()
  text = text.replace(f"model: {{path: {world}/model}}\n", LORA.format(world=world))
  assert "lora" in text
  open(path, "w").write(text)
  return path


@pytest.fixture(scope="module")
def lora_world(tmp_path_factory):
  return write_world(str(tmp_path_factory.mktemp("world")))


@pytest.fixture(scope="module")
def lora_run(lora_world, tmp_path_factory):
  tmp = tmp_path_factory.mktemp("lora")
  out = str(tmp / "full")
  _run(_lora_config(lora_world, out, str(tmp)))
  return out


def test_lora_round_adapters_load_in_peft_on_the_previous_policy(lora_run):
  torch = pytest.importorskip("torch")
  peft = pytest.importorskip("peft")
  import transformers

  ids = torch.tensor([[1, 5, 9, 13, 17, 21, 25, 2]])
  for t in (1, 2):
    adapter = os.path.join(lora_run, f"round_{t}", "adapter")
    assert os.path.exists(os.path.join(adapter, "adapter_model.safetensors"))
    with torch.no_grad():
      policy = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.join(lora_run, f"round_{t}", "policy"), dtype=torch.float32
      )
      base = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.join(lora_run, f"round_{t - 1}", "policy"), dtype=torch.float32
      )
      base_logits = base(ids).logits.numpy()
      got = peft.PeftModel.from_pretrained(base, adapter)(ids).logits.numpy()
      want = policy(ids).logits.numpy()
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    assert np.abs(want - base_logits).max() > 1e-4  # the round trained its adapters


def test_lora_run_resumes_bitwise_after_sigkill(lora_world, lora_run, tmp_path):
  out = str(tmp_path / "killed")
  config = _lora_config(lora_world, out, str(tmp_path))
  assert _kill_when(config, lambda: _has_train_checkpoint(out, 1))
  _run(config)
  expected, got = final_params(lora_run), final_params(out)
  assert expected.keys() == got.keys()
  for name in expected:
    np.testing.assert_array_equal(got[name], expected[name], err_msg=name)
  assert losses(out) == losses(lora_run)
