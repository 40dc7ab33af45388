"""The SSAPO pipeline (paper §4, Algorithm 1): rounds of generate → annotate → follower → leader.

* `runtime`: the objects a run builds once (`Runtime`), model loading and the data split;
* `phases`: generate, annotate, follower and evaluate, each cached in the round directory;
* `leader`: one round's training, with the follower refreshed during it;
* `run`: the loop over rounds, the resume point and the policy exports (`run.run`);
* `rundir`: atomic writes and the local mirror of a remote run directory.

``from ssapo_jax.pipeline.run import run`` is the entry point (``ssapo-train`` calls it).
"""
