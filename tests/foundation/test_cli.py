"""The `merge` command line: help, version, per-method commands and error handling."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from mergekit_ext import __version__
from mergekit_ext.cli.main import COMMANDS, cli
from mergekit_ext.engine import MergeReport

ModelFactory = Callable[..., list[Path]]


def invoke(*args: str) -> object:
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def test_help_lists_every_command() -> None:
    result = invoke("--help")
    assert result.exit_code == 0
    for name, (_, _, description) in COMMANDS.items():
        assert name in result.output
        assert description[:20] in result.output


def test_version() -> None:
    result = invoke("--version")
    assert result.exit_code == 0
    assert __version__ in result.output


def test_ties_command_with_greedy_models(tiny_models: ModelFactory, tmp_path: Path) -> None:
    base, first, second, third = tiny_models(4)
    out = tmp_path / "out"
    result = invoke(
        "ties", "--base", str(base), "--models", str(first), str(second), "--models", str(third),
        "--density", "0.5", "--weights", "1", "0.5", "0.25", "--output", str(out),
    )
    assert result.exit_code == 0, result.output
    assert "Merged" in result.output
    recipe = (out / "merge_recipe.yaml").read_text()
    assert recipe.count("- model:") == 3
    assert "weight: 0.25" in recipe
    config = json.loads((out / "config.json").read_text())
    assert config["torch_dtype"] == "float32"


def test_dtype_option_casts_output(tiny_models: ModelFactory, tmp_path: Path) -> None:
    base, first, second = tiny_models(3)
    out = tmp_path / "out"
    result = invoke("task-arithmetic", "-b", str(base), "-m", str(first), str(second), "--dtype", "bfloat16", "-o", str(out))
    assert result.exit_code == 0, result.output
    state = load_file(str(out / "model.safetensors"))
    assert all(tensor.dtype == torch.bfloat16 for tensor in state.values())
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_user_error_exits_2_with_one_line(tiny_models: ModelFactory, tmp_path: Path) -> None:
    base, first, second = tiny_models(3)
    out = tmp_path / "out"
    out.mkdir()
    (out / "x").write_text("x")
    result = CliRunner().invoke(cli, ["ties", "-b", str(base), "-m", str(first), str(second), "-o", str(out)])
    assert result.exit_code == 2
    error_lines = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(error_lines) == 1
    assert "--force" in error_lines[0]
    assert "Traceback" not in result.output


def run_merge(*arguments: str) -> subprocess.CompletedProcess[str]:
    """Run the `merge` entry point in a child process, as the console script does."""
    return subprocess.run(
        [sys.executable, "-m", "mergekit_ext.cli.main", *arguments], capture_output=True, text=True, timeout=300
    )


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        (["ties", "--base", "MISSING", "--models", "MISSING", "--output", "OUT"], "Invalid value for '--base'"),
        (["ties"], "Missing option '--base'"),
        (["nosuch"], "No such command 'nosuch'"),
    ],
)
def test_usage_error_one_line(tmp_path: Path, arguments: list[str], expected: str) -> None:
    paths = {"MISSING": str(tmp_path / "missing"), "OUT": str(tmp_path / "out")}
    result = run_merge(*[paths.get(argument, argument) for argument in arguments])
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert expected in lines[0]
    assert "--help' for the options" in lines[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("option", "usage"), [("--seed", "merge --seed VALUE ties ..."), ("--debug", "merge --debug ties ...")]
)
def test_global_option_after_command(option: str, usage: str) -> None:
    arguments = ["ties", option] if option == "--debug" else ["ties", option, "7"]
    result = run_merge(*arguments)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert f"{option} is a global option" in lines[0]
    assert usage in lines[0]


def test_refused_output_prints_no_progress_bar(tiny_models: ModelFactory, tmp_path: Path) -> None:
    # The output check fails before any tensor is merged: only the error line is printed.
    base, first = tiny_models(2)
    out = tmp_path / "out"
    out.mkdir()
    (out / "x").write_text("x")
    result = run_merge("ties", "-b", str(base), "-m", str(first), "-o", str(out))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "--force" in lines[0]


EXIT_PROGRAM = """
import atexit
import sys

atexit.register(lambda: print("exit handler ran"))
from mergekit_ext.cli.main import main

sys.argv = ["merge", *sys.argv[1:]]
main()
"""


def test_merge_exit_flushes_output(tiny_models: ModelFactory, tmp_path: Path) -> None:
    # A finished merge ends the process without tearing down the interpreter: exit
    # handlers still run, and piped output still arrives.
    base, first = tiny_models(2)
    out = tmp_path / "out"
    command = [sys.executable, "-c", EXIT_PROGRAM, "ties", "-b", str(base), "-m", str(first), "-o", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "Merged" in result.stdout
    assert result.stdout.rstrip().endswith("exit handler ran")
    merged = load_file(str(out / "model.safetensors"))
    assert set(merged) == set(load_file(str(base / "model.safetensors")))
    assert (out / "README.md").is_file()


def test_merge_with_stdout_closed(tiny_models: ModelFactory, tmp_path: Path) -> None:
    base, first = tiny_models(2)
    out = tmp_path / "out"
    command = [sys.executable, "-c", EXIT_PROGRAM, "ties", "-b", str(base), "-m", str(first), "-o", str(out)]
    # The shell's `>&-`: the child starts without a standard output.
    result = subprocess.run(["bash", "-c", '"$@" >&-', "bash", *command], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert (out / "model.safetensors").is_file()


def test_method_help_shows_defaults() -> None:
    ties_help = " ".join(invoke("ties", "--help").output.split())
    assert "Fraction of each task vector kept (one value or one per model). Default: 1." in ties_help
    assert "Divide by the sum of weights. Default: on." in ties_help
    slerp_help = " ".join(invoke("slerp", "--help").output.split())
    assert "Default: none, required." in slerp_help
    # Shown a second time, the help still names each default once.
    again = " ".join(invoke("ties", "--help").output.split())
    assert again.count("Default: on.") == 1


def test_python_m_package_runs_cli() -> None:
    result = subprocess.run([sys.executable, "-m", "mergekit_ext", "--version"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert __version__ in result.stdout


def test_underscore_command_names() -> None:
    result = invoke("task_arithmetic", "--help")
    assert result.exit_code == 0
    assert "--lambda" in result.output


def test_debug_shows_the_exception(tiny_models: ModelFactory, tmp_path: Path) -> None:
    from mergekit_ext.errors import OutputError

    base, first, second = tiny_models(3)
    out = tmp_path / "out"
    out.mkdir()
    (out / "x").write_text("x")
    result = CliRunner().invoke(cli, ["--debug", "ties", "-b", str(base), "-m", str(first), str(second), "-o", str(out)])
    assert isinstance(result.exception, OutputError)


def test_weights_count_must_match_models(tiny_models: ModelFactory, tmp_path: Path) -> None:
    base, first, second = tiny_models(3)
    result = CliRunner().invoke(
        cli, ["ties", "-b", str(base), "-m", str(first), str(second), "--weights", "1", "2", "3", "-o", str(tmp_path / "o")]
    )
    assert result.exit_code == 2
    assert "--weights got 3 values for 2 models" in result.output


def test_run_command_with_recipe(tiny_models: ModelFactory, tmp_path: Path) -> None:
    base, first, second = tiny_models(3)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"merge_method: dare_ties\nbase_model: {base}\nmodels:\n  - model: {first}\n  - model: {second}\n"
        "parameters:\n  density: 0.5\n"
    )
    out_a, out_b = tmp_path / "a", tmp_path / "b"
    assert invoke("--seed", "7", "run", str(recipe), "-o", str(out_a)).exit_code == 0
    assert invoke("--seed", "7", "run", str(recipe), "-o", str(out_b)).exit_code == 0
    first_run = load_file(str(out_a / "model.safetensors"))
    second_run = load_file(str(out_b / "model.safetensors"))
    for name in first_run:
        assert torch.equal(first_run[name], second_run[name]), name


def test_invalid_device(tiny_models: ModelFactory, tmp_path: Path) -> None:
    base, first, second = tiny_models(3)
    result = CliRunner().invoke(cli, ["--device", "tpu", "ties", "-b", str(base), "-m", str(first), str(second), "-o", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert "invalid device 'tpu'" in result.output


def test_inspect_lists_tensors(tiny_models: ModelFactory) -> None:
    (model,) = tiny_models(1)
    result = invoke("inspect", str(model), "--limit", "0")
    assert result.exit_code == 0
    assert "model.layers.1.mlp.down_proj.weight" in result.output


def test_sigterm_leaves_no_partial_output(tmp_path: Path) -> None:
    import os
    import signal
    import time

    from mergekit_ext.tiny import write_tiny_checkpoint

    models = [write_tiny_checkpoint(tmp_path / f"m{i}", seed=i, num_layers=8, hidden=512, vocab_size=64) for i in range(4)]
    out = tmp_path / "out"
    command = [sys.executable, "-m", "mergekit_ext.cli.main", "tsv", "-b", str(models[0]), "-m", *map(str, models[1:]), "-o", str(out)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not any(".partial-" in path.name for path in tmp_path.iterdir()):
        time.sleep(0.05)
    assert process.poll() is None, "the merge finished before it could be interrupted"
    os.kill(process.pid, signal.SIGTERM)
    # Signals that arrive during the cleanup are ignored, so it still removes the partial output.
    # They are sent once the handler of the first has run: the interpreter runs pending
    # handlers in signal-number order, so a SIGINT pending beside it would run first.
    _wait_until_ignored(process.pid, signal.SIGTERM)
    os.kill(process.pid, signal.SIGTERM)
    os.kill(process.pid, signal.SIGINT)
    _, errors = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGTERM
    assert errors.strip().splitlines()[-1] == "Terminated."
    assert not out.exists()
    assert [path for path in tmp_path.iterdir() if ".partial-" in path.name] == []


def _wait_until_ignored(pid: int, number: int, timeout: float = 30.0) -> None:
    """Wait until process `pid` ignores signal `number`, read from the SigIgn mask in /proc (Linux)."""
    import time

    status = Path(f"/proc/{pid}/status")
    if not status.exists():
        time.sleep(0.5)  # no /proc: give the handler time to run
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in status.read_text().splitlines():
            if line.startswith("SigIgn:") and int(line.split()[1], 16) >> (number - 1) & 1:
                return
        time.sleep(0.005)
    raise AssertionError(f"process {pid} did not start ignoring signal {number} within {timeout} s")


@pytest.mark.parametrize(("handler", "raised"), [("_exit_on_signal", SystemExit), ("_interrupt", KeyboardInterrupt)])
def test_first_signal_ignores_later_ones(handler: str, raised: type[BaseException]) -> None:
    import signal

    from mergekit_ext.cli import main as cli_main

    saved = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        with pytest.raises(raised):
            getattr(cli_main, handler)(signal.SIGTERM, None)
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
    finally:
        for number, previous in saved.items():
            signal.signal(number, previous)


# Installs the CLI's handler, then imports a module that signals this process and runs
# on for 0.3 s. The handler must wait for the import to finish before it raises.
SIGNAL_DURING_IMPORT = """
import signal, sys, time
from mergekit_ext.cli import main as cli_main
signal.signal(getattr(signal, sys.argv[2]), getattr(cli_main, sys.argv[3]))
sys.path.insert(0, sys.argv[1])
try:
    import signalling_module
except BaseException as error:
    print("import interrupted by", type(error).__name__)
    sys.exit(3)
try:
    time.sleep(10)
except BaseException as error:
    print("interrupted after the import by", type(error).__name__, signalling_module.finished)
    sys.exit(0)
print("not interrupted")
"""

SIGNALLING_MODULE = """
import os, signal, sys, time
os.kill(os.getpid(), getattr(signal, sys.argv[2]))
for _ in range(30):
    time.sleep(0.01)
finished = True
"""


@pytest.mark.parametrize(
    ("name", "handler", "raised"),
    [("SIGINT", "_interrupt", "KeyboardInterrupt"), ("SIGTERM", "_exit_on_signal", "SystemExit")],
)
def test_signal_waits_for_import(tmp_path: Path, name: str, handler: str, raised: str) -> None:
    (tmp_path / "signalling_module.py").write_text(SIGNALLING_MODULE)
    command = [sys.executable, "-c", SIGNAL_DURING_IMPORT, str(tmp_path), name, handler]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == f"interrupted after the import by {raised} True"


def test_signal_waits_for_critical_section(monkeypatch: pytest.MonkeyPatch) -> None:
    import os
    import signal
    import time

    from mergekit_ext.cli import main as cli_main
    from mergekit_ext.critical import critical_section

    sent: list[tuple[int, int]] = []
    monkeypatch.setattr(os, "kill", lambda pid, number: sent.append((pid, number)))
    saved = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        with critical_section():
            cli_main._interrupt(signal.SIGINT, None)  # returns, so the section finishes first
            deadline = time.monotonic() + 5
            while not sent and time.monotonic() < deadline:
                time.sleep(0.01)
        assert sent == [(os.getpid(), signal.SIGINT)]
        with pytest.raises(KeyboardInterrupt):
            cli_main._interrupt(signal.SIGINT, None)
    finally:
        for number, previous in saved.items():
            signal.signal(number, previous)


# Sends itself a signal inside `exit_at_once_on_signal`, then waits. The handler must end the process.
EXIT_AT_ONCE = """
import os, signal, sys, time
from mergekit_ext.cli import main as cli_main
signal.signal(signal.SIGINT, cli_main._interrupt)
signal.signal(signal.SIGTERM, cli_main._exit_on_signal)
with cli_main.exit_at_once_on_signal():
    os.kill(os.getpid(), getattr(signal, sys.argv[1]))
    time.sleep(10)
print("still running")
"""


@pytest.mark.parametrize(("name", "status", "message"), [("SIGINT", 130, "Aborted."), ("SIGTERM", 143, "Terminated.")])
def test_signal_exits_at_once_before_work(name: str, status: int, message: str) -> None:
    import time

    started = time.monotonic()
    result = subprocess.run([sys.executable, "-c", EXIT_AT_ONCE, name], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == status, result.stderr
    assert result.stderr.strip() == message
    assert result.stdout == ""
    assert time.monotonic() - started < 8


def test_in_process_merge_keeps_signal_handlers(tiny_models: ModelFactory, tmp_path: Path) -> None:
    import signal

    base, first, second = tiny_models(3)
    before = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}
    result = invoke("ties", "-b", str(base), "-m", str(first), str(second), "-o", str(tmp_path / "out"))
    assert result.exit_code == 0
    # Signals are ignored after the commit only under the `merge` entry point's own handlers.
    assert signal.getsignal(signal.SIGINT) == before[signal.SIGINT]
    assert signal.getsignal(signal.SIGTERM) == before[signal.SIGTERM]


def test_ctrl_c_exits_with_130(tmp_path: Path) -> None:
    import os
    import signal
    import time

    from mergekit_ext.tiny import write_tiny_checkpoint

    models = [write_tiny_checkpoint(tmp_path / f"m{i}", seed=i, num_layers=8, hidden=512, vocab_size=64) for i in range(4)]
    out = tmp_path / "out"
    command = [sys.executable, "-m", "mergekit_ext.cli.main", "tsv", "-b", str(models[0]), "-m", *map(str, models[1:]), "-o", str(out)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not any(".partial-" in path.name for path in tmp_path.iterdir()):
        time.sleep(0.05)
    assert process.poll() is None, "the merge finished before it could be interrupted"
    os.kill(process.pid, signal.SIGINT)
    _, errors = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGINT
    assert errors.strip().endswith("Aborted.")
    assert not out.exists()
    assert [path for path in tmp_path.iterdir() if ".partial-" in path.name] == []


def test_merge_error_prints_no_progress_bar(tiny_models: ModelFactory, tmp_path: Path) -> None:
    # The NaN is found while merging, after the bar has started. Neither the bar nor an
    # empty line may precede the error.
    base, first = tiny_models(2)
    state = load_file(str(first / "model.safetensors"))
    last_name = sorted(state)[-1]
    state[last_name].view(-1)[0] = float("nan")
    save_file(state, str(first / "model.safetensors"))
    result = run_merge("--log-level", "warning", "ties", "-b", str(base), "-m", str(first), "-o", str(tmp_path / "out"))
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert lines[-1].startswith("Error:"), result.stderr
    assert last_name in lines[-1]
    assert not any("ties merge" in line for line in lines), result.stderr
    assert "" not in lines, result.stderr
    assert not (tmp_path / "out").exists()


def test_summary_line_units(tmp_path: Path) -> None:
    report = MergeReport(output=tmp_path, tensors=6, bytes_written=1_313_024, seconds=0.0123, peak_rss_bytes=462_888_000)
    assert report.summary() == f"Merged 6 tensors into {tmp_path}: 1.31 MB written in 0.01 s, peak memory 462.89 MB"
