"""What an SSAPO run holds in accelerator memory in each phase of a round (jax-free arithmetic).

One description of the pipeline's residency, shared by the run and by ``ssapo-plan``: the plan
adds each phase's compiled program to what `phases` says is held beside it, so a phase's
resident bytes are "its program plus everything else the run keeps on the chip then".

The target behaviour (each phase holds only what it needs):

* ``sampling`` (round t >= 1, `pipeline.phases.generate`): the `generate` program holds the
  decode-layout copy of pi_{t-1}; beside it only pi_{t-1}'s master parameters (needed by the
  scoring next). No train state: round t-1's optimizer moments are dropped once its round-end
  checkpoint is written. The annotation reference (SFT, or pi_{t-2}) waits in host memory.
* ``scoring`` (`phases.annotate`): the `score_logps` program holds the model it scores, the
  policy and then the judge; beside it pi_{t-1}'s master parameters while the judge is scored.
  The judge is brought from host memory for its pass and returned (or dropped) after it.
* ``follower`` (reference log-probs of the round's pairs, `phases.follower`): the `score_logps`
  program holds the train reference; beside it pi_{t-1} when the reference is another model
  (SFT). The judge is not resident: its log-probs are cached by the scoring.
* ``training`` (`leader.train_round`): the `train_step` program holds the whole TrainState
  (master parameters, optimizer moments, a reference in the step); nothing beside it. Models
  needed in later rounds (SFT as judge or reference, pi_{t-1} as pi_{t+1}'s judge) wait in host
  memory.

Round 0 has ``follower`` (SFT reference log-probs of the seed) and ``training`` only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}

# The plan's program that runs each phase.
PHASE_PROGRAMS = {"sampling": "generate", "scoring": "score_logps", "follower": "score_logps",
                  "training": "train_step"}


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


def model_bytes(num_params: int, dtype: str, shards: int) -> float:
  """Bytes per chip of ``num_params`` parameters in ``dtype`` split over ``shards`` chips."""
  if dtype not in _DTYPE_BYTES:
    raise ValueError(f"model_bytes: unknown dtype {dtype!r}; known: {', '.join(_DTYPE_BYTES)}")
  return num_params * _DTYPE_BYTES[dtype] / shards


def phases(experiment, *, num_params: int, shards: int, round_index: int = 1) -> list[Phase]:
  """The phases of round ``round_index`` of ``experiment`` and what each holds beside its
  program, per chip, for a model of ``num_params`` parameters whose master copy is sharded over
  ``shards`` chips (the mesh's fsdp x tensor extent).

  Args:
    experiment: an `ssapo_jax.experiment.ExperimentConfig` (reads ``train.param_dtype``,
      ``train.reference``, ``rounds.annotation_reference``, ``rounds.train_reference``).
    num_params: parameters of the policy (all of them: embeddings, norms, LM head).
    shards: chips each parameter is split over.
    round_index: 0 (the seed round: follower and training) or a later round (all four phases).

  Returns:
    The phases in run order.
  """
  t_cfg, r = experiment.train, experiment.rounds
  master = model_bytes(num_params, t_cfg.param_dtype, shards)
  t = round_index
  policy = "SFT model" if t == 0 else f"policy pi_{t - 1}"
  judge = ("SFT model" if r.annotation_reference == "sft" else
           ("SFT model" if t < 2 else f"policy pi_{t - 2}"))
  reference = ("SFT model" if t == 0 or r.train_reference == "sft" else policy)
  # Models a later round reads: SFT as judge or train reference; pi_{t-1} as pi_{t+1}'s judge.
  later = []
  if r.annotation_reference == "sft" or r.train_reference == "sft":
    later.append("SFT model")
  if r.annotation_reference == "previous" and t >= 1 and t < r.num_rounds:
    later.append(policy)
  host = lambda names, exclude=(): tuple(
      Held(f"{n} (master, {t_cfg.param_dtype})", master, "host")
      for n in dict.fromkeys(names) if n not in exclude)
  resident = lambda name: Held(f"{name} (master, {t_cfg.param_dtype})", master, "hbm")
  out = []
  if t >= 1:
    out.append(Phase("sampling", "generate",
                     (resident(policy),) + host([judge] + later, exclude=(policy,))))
    out.append(Phase("scoring", "score_logps",
                     (resident(policy),) + host(later, exclude=(policy, judge))))
  follower_held = (resident(policy),) if reference != policy else ()
  out.append(Phase("follower", "score_logps",
                   follower_held + host(later, exclude=(policy, reference))))
  out.append(Phase("training", "train_step", host(later)))
  return out


def resident_bytes(phase: Phase, program_bytes: float) -> float:
  """A phase's peak bytes per chip: its program's (`ProgramPlan.total_bytes`) plus what is
  held beside it."""
  return program_bytes + phase.hbm_bytes


def phase_names(experiment) -> Sequence[str]:
  """Names of the phases a round >= 1 of ``experiment`` runs (for tables)."""
  return [p.name for p in phases(experiment, num_params=1, shards=1, round_index=1)]
