"""Tests for ssapo_jax/metrics.py: JSONL records and TensorBoard event files read back."""

from __future__ import annotations

import json
import math
import pathlib
import struct
import zlib

import jax.numpy as jnp
import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from ssapo_jax.metrics import MetricsLogger, read_metrics, to_json_value


def _crc32c(data: bytes) -> int:
  """CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), bit by bit: independent of tensorboardX."""
  crc = 0xFFFFFFFF
  for byte in data:
    crc ^= byte
    for _ in range(8):
      crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
  return crc ^ 0xFFFFFFFF


def _masked(crc: int) -> int:
  return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


def _read_events(path: pathlib.Path) -> list[event_pb2.Event]:
  """Reads a TFRecord file (u64 length, masked crc, payload, masked crc), checking both CRCs."""
  data, events, pos = path.read_bytes(), [], 0
  while pos < len(data):
    header = data[pos:pos + 8]
    (length,) = struct.unpack("<Q", header)
    (header_crc,) = struct.unpack("<I", data[pos + 8:pos + 12])
    assert header_crc == _masked(_crc32c(header))
    payload = data[pos + 12:pos + 12 + length]
    (payload_crc,) = struct.unpack("<I", data[pos + 12 + length:pos + 16 + length])
    assert payload_crc == _masked(_crc32c(payload))
    events.append(event_pb2.Event.FromString(payload))
    pos += 16 + length
  return events


def _scalars(output_dir: pathlib.Path) -> dict[str, list[tuple[int, float]]]:
  found: dict[str, list[tuple[int, float]]] = {}
  for path in sorted((output_dir / "tensorboard").glob("events.out.tfevents.*")):
    for event in _read_events(path):
      for value in event.summary.value:
        found.setdefault(value.tag, []).append((event.step, value.simple_value))
  return found


def test_crc32c_reference_check_value():
  assert _crc32c(b"123456789") == 0xE3069283  # the standard CRC-32C check value


def test_to_json_value_conversions():
  assert to_json_value(np.float32(0.5)) == 0.5 and isinstance(to_json_value(np.float32(0.5)), float)
  assert to_json_value(jnp.asarray(3, jnp.int32)) == 3
  assert isinstance(to_json_value(jnp.asarray(3, jnp.int32)), int)
  assert to_json_value(jnp.ones((1, 1), jnp.bfloat16)) == 1.0
  assert to_json_value(np.bool_(True)) == 1
  assert to_json_value(float("nan")) is None and to_json_value(np.float32("inf")) is None
  with pytest.raises(ValueError, match="metric 'loss' must be a scalar, got an array of shape"):
    to_json_value(np.zeros(3), name="loss")
  with pytest.raises(ValueError, match="unsupported type"):
    to_json_value(object(), name="x")


def test_jsonl_and_tensorboard_round_trip(tmp_path):
  with MetricsLogger(tmp_path, enabled=True) as logger:
    for step in (1, 2, 3):
      logger.log(step, {"loss": jnp.float32(1.0 / step), "rewards/chosen": np.float32(0.1 * step),
                        "learning_rate": 5e-7, "tokens_per_second": 1000.0 * step,
                        "skipped_nonfinite": jnp.int32(step == 3), "rewards/margins": float("nan")},
                 round=0, phase="train")
  records = read_metrics(tmp_path)
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  assert all(json.loads(line) == r for line, r in zip(lines, records))  # strict JSON per line
  assert [r["step"] for r in records] == [1, 2, 3]
  for r in records:
    s = r["step"]
    assert r["round"] == 0 and r["phase"] == "train"
    assert math.isclose(r["loss"], 1.0 / s, rel_tol=1e-6)
    assert math.isclose(r["rewards/chosen"], 0.1 * s, rel_tol=1e-6)
    assert r["learning_rate"] == 5e-7 and r["tokens_per_second"] == 1000.0 * s
    assert r["skipped_nonfinite"] == int(s == 3) and r["rewards/margins"] is None
    assert isinstance(r["time"], float)
  scalars = _scalars(tmp_path)
  assert [s for s, _ in scalars["loss"]] == [1, 2, 3]
  np.testing.assert_allclose([v for _, v in scalars["loss"]], [1.0, 0.5, 1 / 3], rtol=1e-6)
  np.testing.assert_allclose([v for _, v in scalars["rewards/chosen"]], [0.1, 0.2, 0.3], rtol=1e-6)
  assert math.isnan(scalars["rewards/margins"][0][1])
  assert "round" not in scalars and "phase" not in scalars


def test_resume_appends_and_drops_records_after_the_checkpoint(tmp_path):
  with MetricsLogger(tmp_path, enabled=True, tensorboard=False) as logger:
    for step in range(1, 6):
      logger.log(step, {"loss": float(step)}, round=1)
  # The run was killed after logging step 5 and resumes from a checkpoint at step 3.
  with MetricsLogger(tmp_path, enabled=True, tensorboard=False, resume_step=3) as logger:
    logger.log(4, {"loss": 40.0}, round=1)
  assert [(r["step"], r["loss"]) for r in read_metrics(tmp_path)] == [
      (1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]
  # Without resume_step a new logger only appends.
  with MetricsLogger(tmp_path, enabled=True, tensorboard=False) as logger:
    logger.log(5, {"loss": 50.0})
  assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4, 5]


def test_rewind_drops_records_after_a_fallback_checkpoint(tmp_path):
  with MetricsLogger(tmp_path, enabled=True) as logger:
    for step in range(1, 8):
      logger.log(step, {"loss": float(step)})
  # Opened to resume from step 7, whose checkpoint then fails verification: it falls back to 5.
  with MetricsLogger(tmp_path, enabled=True, resume_step=7) as logger:
    logger.rewind(5)
    logger.log(6, {"loss": 60.0})
  assert [(r["step"], r["loss"]) for r in read_metrics(tmp_path)] == [
      (1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0), (5, 5.0), (6, 60.0)]
  files = sorted((tmp_path / "tensorboard").glob("events.out.tfevents.*"),
                 key=lambda p: p.stat().st_mtime_ns)
  purge = [e for e in _read_events(files[-1]) if e.HasField("session_log")]
  assert [(e.session_log.status, e.step) for e in purge] == [(event_pb2.SessionLog.START, 6)]


def test_disabled_writes_nothing_and_clashes_are_errors(tmp_path):
  logger = MetricsLogger(tmp_path / "off", enabled=False)
  assert logger.log(1, {"loss": 1.0}) is None
  logger.close()
  assert not (tmp_path / "off").exists()
  with MetricsLogger(tmp_path / "on", enabled=True, tensorboard=False) as logger:
    with pytest.raises(ValueError, match="clashes with a context field"):
      logger.log(1, {"round": 1.0}, round=1)
  # Default: only process 0 writes (this test process is process 0).
  with MetricsLogger(tmp_path / "default", tensorboard=False) as logger:
    assert logger.enabled


def test_resume_purges_tensorboard_events_after_the_checkpoint(tmp_path):
  with MetricsLogger(tmp_path, enabled=True) as logger:
    for step in range(1, 6):
      logger.log(step, {"loss": float(step)})
  with MetricsLogger(tmp_path, enabled=True, resume_step=3) as logger:
    logger.log(4, {"loss": 40.0})
  files = sorted((tmp_path / "tensorboard").glob("events.out.tfevents.*"),
                 key=lambda p: p.stat().st_mtime_ns)
  assert len(files) == 2
  assert [s for s, _ in _scalars(tmp_path)["loss"]] == [1, 2, 3, 4, 5, 4]
  # TensorBoard discards earlier events with step >= 4 when it meets a START session log at 4.
  purge = [e for e in _read_events(files[-1]) if e.HasField("session_log")]
  assert [(e.session_log.status, e.step) for e in purge] == [(event_pb2.SessionLog.START, 4)]


# ----------------------------------------------------------------------------- W&B (offline)


def _wandb_records(path: pathlib.Path) -> list[bytes]:
  """The records of a ``.wandb`` file, read independently of wandb: a 7-byte header
  (``:W&B``, magic 0xBEE1, version 0), then LevelDB-log blocks of 32 KiB whose chunks have a
  7-byte header (CRC-32 of type byte and payload, u16 length, type: 1 full, 2 first, 3 middle,
  4 last); a block's tail shorter than a header is padding."""
  data, records, chunks, pos, block = path.read_bytes(), [], b"", 7, 32768
  assert data[:4] == b":W&B" and struct.unpack("<H", data[4:6])[0] == 0xBEE1
  while pos + 7 <= len(data):
    if block - pos % block < 7:
      pos += block - pos % block
      continue
    crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
    payload = data[pos + 7:pos + 7 + length]
    assert crc == zlib.crc32(payload, zlib.crc32(bytes([kind])))
    pos += 7 + length
    if kind == 0 and length == 0:  # zero padding at the end of a block
      continue
    chunks += payload
    if kind in (1, 4):
      records.append(chunks)
      chunks = b""
  return records


def _wandb_history(output_dir: pathlib.Path) -> list[tuple[str, list[dict]]]:
  """``(run id, history rows)`` of each offline W&B run under ``output_dir/wandb``, oldest first;
  each row keeps the logged keys (W&B's own ``_step``, ``_runtime``, ``_timestamp`` dropped)."""
  from wandb.proto import wandb_internal_pb2
  runs = []
  for path in sorted((output_dir / "wandb").glob("offline-run-*/run-*.wandb")):
    run_id, rows = None, []
    for raw in _wandb_records(path):
      record = wandb_internal_pb2.Record.FromString(raw)
      if record.WhichOneof("record_type") == "run":
        run_id = record.run.run_id
      elif record.WhichOneof("record_type") == "history":
        row = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
               for item in record.history.item}
        rows.append({k: v for k, v in row.items() if not k.startswith("_")})
    runs.append((run_id, rows))
  return runs


def test_wandb_offline_holds_the_jsonl_metrics_and_a_resume_continues_the_run(tmp_path,
                                                                              monkeypatch):
  pytest.importorskip("wandb")
  from ssapo_jax.metrics import MetricsConfig, WandbConfig, metric_sinks
  monkeypatch.setenv("WANDB_MODE", "offline")
  monkeypatch.setenv("WANDB_SILENT", "true")
  config = MetricsConfig(wandb=WandbConfig(project="ssapo-test", name="t", mode="offline"))

  def logger(resume_step):
    sinks = metric_sinks(str(tmp_path), config, tensorboard=False, run_config={"seed": 3})
    return MetricsLogger(tmp_path, enabled=True, resume_step=resume_step, sinks=sinks)

  with logger(-1) as log:
    for step in (1, 2, 3):
      log.log(step, {"loss": 1.0 / step, "rewards/chosen": np.float32(0.25 * step)}, round=0)
    log.log(3, {}, config_version=1)  # no scalars: JSONL only
  run_id = (tmp_path / "wandb_run_id").read_text().strip()
  with logger(2) as log:  # resumed from a checkpoint at step 2: step 3 runs again
    for step in (3, 4):
      log.log(step, {"loss": 2.0 / step, "rewards/chosen": jnp.float32(0.5)}, round=0)
  assert (tmp_path / "wandb_run_id").read_text().strip() == run_id

  runs = _wandb_history(tmp_path)
  assert [r for r, _ in runs] == [run_id, run_id]  # the resume continued the same W&B run
  rows = [row for _, history in runs for row in history]
  jsonl = [r for r in read_metrics(tmp_path) if "loss" in r]
  assert [r["step"] for r in jsonl] == [1, 2, 3, 4]
  # W&B keeps the step logged past the checkpoint (step 3 of the first run) and the rerun's.
  assert [row["step"] for row in rows] == [1, 2, 3, 3, 4]
  kept = rows[:2] + rows[3:]
  for row, record in zip(kept, jsonl):
    assert set(row) == {"step", "loss", "rewards/chosen"}
    for key in row:
      assert row[key] == pytest.approx(record[key], rel=1e-7), (key, row, record)

  with logger(-1) as log:  # a fresh start (not a resume) is a new W&B run
    log.log(1, {"loss": 1.0})
  assert (tmp_path / "wandb_run_id").read_text().strip() != run_id
