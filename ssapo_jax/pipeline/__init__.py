"""The SSAPO pipeline (paper §4, Algorithm 1): rounds of generate → annotate → follower → leader.

* `runtime`: the objects a run builds once (`Runtime`), model loading and the data split;
* `phases`: generate, annotate, train_set (reference log-probs and the follower's atoms) and
  evaluate, each cached in the round directory and copied up when it ends;
* `leader`: one round's training (the Stackelberg policy), a step loop with hooks for the
  follower refresh, metrics and checkpoints;
* `round`: one round as a unit (`round.run_round`);
* `run`: set-up, the resume point and the loop over rounds (`run.run`);
* `hosts`: the work split over processes (process 0 writes shared files and broadcasts them).

``from ssapo_jax.pipeline.run import run`` is the entry point (``ssapo-train`` calls it).
"""
