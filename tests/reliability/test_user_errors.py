"""Every user-caused failure found by the outside probe is one line naming the file, field or value, exit 2,
before any work: bad catalogs, empty or oversized task sets, a resume that cannot be, a busy port, a run
directory that another process holds, a disk that is full or read-only. Each runs the real command line
(``rltrain.cli.main``) in this process; none needs a model (the ones that would load one must fail first)."""

from __future__ import annotations

import errno
import json
import logging
import socket
import subprocess
from pathlib import Path

import pytest
import yaml
from kill_env import fill

from rltrain.cli import main
from rltrain.envs.room_selection.catalog import reference_catalog_path
from rltrain.envs.room_selection.tasks import MAX_ID_CHARS, MAX_ROW_BYTES, MAX_TASKS
from rltrain.metrics import read_metrics
from rltrain.run_lock import RunDirLock

EVAL = "recipes/room_selection_eval.yaml"
ROW = ('{"id": "a", "task_input": {"date": "2025-10-13", "time": "09:00", "duration_min": 30, "attendees": 2, '
       '"needs": [], "accessible_required": false}, "expected_choice": "Orion"}')


def _one_line_error(caplog: pytest.LogCaptureFixture, *args: str) -> str:
    """Run ``rltrain ARGS``; it must exit 2 with exactly one error record, one line, no traceback."""
    caplog.clear()
    caplog.set_level(logging.INFO)
    assert main(list(args)) == 2
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, [r.getMessage() for r in errors]
    [error] = errors
    assert error.exc_info is None and "\n" not in error.getMessage() and "Traceback" not in caplog.text
    return error.getMessage()


def _solver_eval(tmp_path: Path, *more: str) -> list[str]:
    return ["eval", EVAL, "--agent", "solver", "--no-progress", "--set", f"output_dir={tmp_path}", *more]


def test_bad_catalogs_name_the_file(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    catalog = json.loads(reference_catalog_path().read_text())
    catalog["rooms"][0]["capacity"] = -3
    negative = tmp_path / "negative.json"
    negative.write_text(json.dumps(catalog))
    message = _one_line_error(caplog, *_solver_eval(tmp_path, "--catalog", str(negative)))
    assert str(negative) in message and "capacity" in message
    binary = tmp_path / "latin1.json"
    binary.write_bytes('{"rooms": ["caf\u00e9"]}'.encode("latin-1"))
    message = _one_line_error(caplog, *_solver_eval(tmp_path, "--catalog", str(binary)))
    assert str(binary) in message and "UTF-8" in message
    assert "UTF-8" in _one_line_error(caplog, "data", "room-selection", "--catalog", str(binary), "--out",
                                      str(tmp_path / "x.jsonl"))


def test_empty_inputs_are_errors(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert "has no tasks" in _one_line_error(caplog, *_solver_eval(tmp_path, "--tasks", str(empty)))
    message = _one_line_error(caplog, "train", "recipes/room_selection_grpo_cpu.yaml", "--no-progress",
                              "--set", f"output_dir={tmp_path}", "--set", f"data.train={empty}")
    assert str(empty) in message and "has no tasks" in message
    out = tmp_path / "none.jsonl"
    assert "-5" in _one_line_error(caplog, "data", "room-selection", "--n", "-5", "--out", str(out))
    assert not out.exists()


def test_sizes_are_bounded_before_work(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    message = _one_line_error(caplog, *_solver_eval(tmp_path, "--tasks", "generated:n=1000000000,seed=1"))
    assert str(MAX_TASKS) in message
    assert str(MAX_TASKS) in _one_line_error(caplog, "data", "room-selection", "--n", str(MAX_TASKS + 1),
                                             "--out", str(tmp_path / "big.jsonl"))
    long_id = tmp_path / "long_id.jsonl"
    long_id.write_text(ROW.replace('"id": "a"', f'"id": "{"x" * (MAX_ID_CHARS + 1)}"') + "\n")
    message = _one_line_error(caplog, *_solver_eval(tmp_path, "--tasks", str(long_id)))
    assert f"{long_id}:1" in message and "id" in message
    huge_row = tmp_path / "huge_row.jsonl"
    huge_row.write_text(ROW + "\n" + ROW.replace('"needs": []', f'"needs": ["{"y" * MAX_ROW_BYTES}"]') + "\n")
    assert f"{huge_row}:2" in _one_line_error(caplog, *_solver_eval(tmp_path, "--tasks", str(huge_row)))


def test_text_fields_stay_text_on_the_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*_solver_eval(tmp_path, "--limit", "1", "--json"), "--name", "007"]) == 0
    assert json.loads(capsys.readouterr().out)["run_dir"] == str(tmp_path / "007")
    assert yaml.safe_load((tmp_path / "007" / "recipe.yaml").read_text())["name"] == "007"


def test_resume_that_cannot_be_is_refused_before_touching_anything(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    assert main(_solver_eval(tmp_path, "--limit", "1", "--name", "evaluated")) == 0
    message = _one_line_error(caplog, "resume", str(tmp_path / "evaluated"))
    assert "recipe.yaml" in message and "algorithm" in message

    # a GRPO run whose checkpoint was trained with r=4, resumed after recipe.yaml was edited to r=8
    run = tmp_path / "edited"
    recipe = yaml.safe_load(Path("recipes/room_selection_grpo_cpu.yaml").read_text())
    recipe.update(name="edited", output_dir=str(tmp_path))
    recipe["algorithm"]["lora"] = {"r": 8, "alpha": 16}
    run.mkdir()
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    checkpoint = run / "checkpoints" / "checkpoint-1"
    checkpoint.mkdir(parents=True)
    (checkpoint / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 16, "peft_type": "LORA"}))
    (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": 1}))
    lines = [{"step": 0, "event": "baseline"}, {"step": 1, "event": "rollouts"}, {"step": 2, "event": "rollouts"}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    message = _one_line_error(caplog, "resume", str(run))
    assert "lora.r is 8" in message and "checkpoint-1" in message and "with 4" in message
    assert read_metrics(run / "metrics.jsonl") == lines, "nothing was deleted"


def test_a_busy_port_is_reported_before_the_model_loads(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        # a model that does not exist: had the model been loaded first, that would be the error
        message = _one_line_error(caplog, "serve", "--port", str(port), "--set", f"output_dir={tmp_path}",
                                  "--set", f"model.name={tmp_path / 'no-such-model'}")
    assert f"127.0.0.1:{port}" in message and "in use" in message


def test_a_run_directory_held_by_another_process_is_refused(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with RunDirLock(tmp_path / "held", command="rltrain train held.yaml"):
        message = _one_line_error(caplog, *_solver_eval(tmp_path, "--name", "held"))
    assert str(tmp_path / "held") in message and "in use by pid" in message and "rltrain train held.yaml" in message
    assert not (tmp_path / "held" / "recipe.yaml").exists(), "nothing written into a held run directory"
    assert main(_solver_eval(tmp_path, "--name", "held", "--limit", "1")) == 0, "free once released"



def test_a_full_or_read_only_disk_is_one_line(small_disk: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert main(_solver_eval(small_disk, "--limit", "2", "--name", "run")) == 0
    assert fill(small_disk / "filler").errno == errno.ENOSPC
    message = _one_line_error(caplog, *_solver_eval(small_disk, "--limit", "2", "--name", "run"))
    assert "No space left on device" in message or "disk is full" in message
    (small_disk / "filler").unlink()
    read_only = small_disk.parent / "read-only"  # the same files, seen through a read-only bind mount
    read_only.mkdir()
    subprocess.run(["mount", "--bind", str(small_disk), str(read_only)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(read_only)], check=True)
        message = _one_line_error(caplog, *_solver_eval(read_only, "--limit", "2", "--name", "run"))
        assert str(read_only / "run") in message and "Read-only" in message
        assert "Read-only" in _one_line_error(caplog, "resume", str(read_only / "run"))
        assert "Read-only" in _one_line_error(caplog, "data", "room-selection", "--n", "3",
                                              "--out", str(read_only / "tasks.jsonl"))
    finally:
        subprocess.run(["umount", "-l", str(read_only)], check=False)
