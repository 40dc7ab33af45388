"""What an SSAPO run holds in accelerator memory in each phase of a round (jax-free arithmetic).

One description of the pipeline's residency, shared by the run and by ``ssapo-plan``: the run
keeps exactly the models `models_held` names (`pipeline.round` drops the others at the end of
each round), and the plan adds each phase's compiled program to what `phases` says is held
beside it, so a phase's resident bytes are "its program plus everything else the run keeps on
the chip then".

What the run holds through round t >= 1: the SFT model (π_{-1}: round 0's reference, the judge
with ``annotation_reference: sft``, the train reference with ``train_reference: sft``), π_{t-1}
(the sampler's policy, the train reference) and, with ``annotation_reference: previous``, π_{t-2}
(the judge). No train state outside training: a round's TrainState, with its optimizer
moments, lives only inside `pipeline.round.run_round`.

* ``sampling`` (`phases.generate`): the `generate` program holds the decode-layout copy of
  π_{t-1}; beside it every held model's master parameters.
* ``scoring`` (`phases.annotate`): the `score_logps` program holds the model it scores; beside
  it the other held models.
* ``follower`` (`phases.train_set`: reference log-probs): the program holds the train
  reference; beside it the other held models.
* ``training`` (`leader.train_round`): the `train_step` program holds the whole TrainState
  (fresh master parameters, optimizer moments, a reference in the step); beside it every held
  model (π_{t-1}, the round's starting point, stays held).

Models are not offloaded to host memory: every held model is on the chip (``where="hbm"``).
Held models are in `held_dtype`: the master ``train.param_dtype``, or with LoRA the compute
dtype (frozen; the train state's base is a separate compute-dtype copy inside the program).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}

# The plan's program that runs each phase.
PHASE_PROGRAMS = {
  "sampling": "generate",
  "scoring": "score_logps",
  "follower": "score_logps",
  "training": "train_step",
}


@dataclasses.dataclass(frozen=True)
class Held:
  """One thing the run keeps beside a phase's program, per chip."""

  name: str
  bytes: float  # per chip
  where: str  # "hbm" (resident on the chip) or "host" (offloaded to host memory)


@dataclasses.dataclass(frozen=True)
class Phase:
  """A phase of a round: the plan program that runs it and what is held beside that program."""

  name: str  # sampling, scoring, follower, training
  program: str  # key of ssapo_jax.plan.PROGRAMS
  held: tuple[Held, ...]

  @property
  def hbm_bytes(self) -> float:
    """Bytes per chip held on the chip beside the program."""
    return sum(h.bytes for h in self.held if h.where == "hbm")

  @property
  def host_bytes(self) -> float:
    return sum(h.bytes for h in self.held if h.where == "host")


def held_dtype(experiment) -> str:
  """The dtype the run loads and holds its models in: ``train.param_dtype`` (the master
  weights training starts from), or with LoRA (``model.lora``) ``train.compute_dtype``: no
  held model is ever trained in place, and merged LoRA policies are in the compute dtype."""
  t_cfg = experiment.train
  return t_cfg.compute_dtype if experiment.model.lora is not None else t_cfg.param_dtype


def model_bytes(num_params: int, dtype: str, shards: int) -> float:
  """Bytes per chip of ``num_params`` parameters in ``dtype`` split over ``shards`` chips."""
  if dtype not in _DTYPE_BYTES:
    raise ValueError(f"model_bytes: unknown dtype {dtype!r}; known: {', '.join(_DTYPE_BYTES)}")
  return num_params * _DTYPE_BYTES[dtype] / shards


def models_held(rounds, round_index: int) -> tuple[int, ...]:
  """Rounds s whose policy π_s the run keeps on the chip through round ``round_index`` (-1 is
  the SFT model, always kept): π_{t-1}, and π_{t-2} when it is the judge
  (``rounds.annotation_reference: previous``)."""
  t = round_index
  held = [-1]
  if t >= 1:
    held.append(t - 1)
  if t >= 2 and rounds.annotation_reference == "previous":
    held.append(t - 2)
  return tuple(held)


def _model_name(s: int) -> str:
  return "SFT model" if s < 0 else f"policy pi_{s}"


def phases(experiment, *, num_params: int, shards: int, round_index: int = 1) -> list[Phase]:
  """The phases of round ``round_index`` of ``experiment`` and what each holds beside its
  program, per chip, for a model of ``num_params`` parameters whose master copy is sharded over
  ``shards`` chips (the mesh's fsdp x tensor extent).

  Args:
    experiment: an `ssapo_jax.experiment.ExperimentConfig` (reads `held_dtype`,
      ``rounds.annotation_reference``, ``rounds.train_reference``).
    num_params: parameters of the policy (all of them: embeddings, norms, LM head).
    shards: chips each parameter is split over.
    round_index: 0 (the seed round: follower and training) or a later round (all four phases).

  Returns:
    The phases in run order.
  """
  r = experiment.rounds
  dtype = held_dtype(experiment)
  master = model_bytes(num_params, dtype, shards)
  t = round_index
  held = [_model_name(s) for s in models_held(r, t)]
  policy = _model_name(t - 1)
  judge = _model_name(-1 if r.annotation_reference == "sft" else t - 2)
  reference = _model_name(-1 if t == 0 or r.train_reference == "sft" else t - 1)
  beside = lambda exclude=None: tuple(  # noqa: E731
    Held(f"{n} ({'frozen' if experiment.model.lora else 'master'}, {dtype})", master, "hbm")
    for n in held
    if n != exclude
  )
  out = []
  if t >= 1:
    out.append(Phase("sampling", "generate", beside()))
    # The policy and then the judge are scored; either way one held model is the program's.
    out.append(Phase("scoring", "score_logps", beside(judge if judge in held else policy)))
  out.append(Phase("follower", "score_logps", beside(reference)))
  out.append(Phase("training", "train_step", beside()))
  return out


def resident_bytes(phase: Phase, program_bytes: float) -> float:
  """A phase's peak bytes per chip: its program's (`ProgramPlan.total_bytes`) plus what is
  held beside it."""
  return program_bytes + phase.hbm_bytes


def phase_names(experiment) -> Sequence[str]:
  """Names of the phases a round >= 1 of ``experiment`` runs (for tables)."""
  return [p.name for p in phases(experiment, num_params=1, shards=1, round_index=1)]
