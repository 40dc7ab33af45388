"""Errors a user can fix, and the exit status each one gives ``ssapo-train`` (one table).

=====  ====================  =================================================================
 exit  error class           raised for
=====  ====================  =================================================================
  0    (none)                success, ``--check`` passed, or a run that was already complete
  2    `ConfigError`         a bad config file, key, value or command-line flag
  3    `DataError`           a missing data source, a missing column, a bad row
  4    `RunDirError`         the output directory is locked by another run, not writable, or
                             holds a run with a different config
  5    `CheckpointError`     a missing/incomplete model directory or tokenizer, an unreadable
                             safetensors file, no readable run checkpoint
  6    `NonFiniteError`      training produced non-finite losses or gradients for too long
=====  ====================  =================================================================

``ssapo-train`` prints each of these as one line, ``ssapo-train: error: <message>``, and a
traceback only with ``--debug``. Any other exception is a bug: it exits 1 with its traceback.
The classes subclass the built-in exception that code used to catch (``ValueError``,
``RuntimeError``), so existing ``except`` clauses keep working.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_BUG = 1


class SsapoError(Exception):
  """A problem the user can fix; ``exit_code`` is the process exit status it maps to."""

  exit_code = EXIT_BUG


class ConfigError(SsapoError, ValueError):
  """A configuration problem, with the dotted path of the offending key in the message."""

  exit_code = 2


class DataError(SsapoError, ValueError):
  """A data source that is missing, lacks a column, or holds a bad row."""

  exit_code = 3


class RunDirError(SsapoError):
  """The output directory cannot be used: locked, unwritable, or holding another config."""

  exit_code = 4


class CheckpointError(SsapoError, ValueError):
  """A model directory or checkpoint that is missing, incomplete, corrupt or mismatched."""

  exit_code = 5


class NonFiniteError(SsapoError, RuntimeError):
  """Training produced non-finite losses or gradients for too many consecutive steps."""

  exit_code = 6


EXIT_CODES = {
  cls.__name__: cls.exit_code
  for cls in (ConfigError, DataError, RunDirError, CheckpointError, NonFiniteError)
}
