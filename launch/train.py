"""Thin launcher: ``python launch/train.py configs/<file>.yaml key=value ...`` (same as ``ssapo-train``)."""

import os
import sys

# Running the file directly puts launch/ (not the repository root) on sys.path.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ssapo_jax.cli import main  # noqa: E402

if __name__ == "__main__":
  sys.exit(main())
