"""Start torchrun for the user: `launch` (the notebooks) and `python -m xrai train --nproc N`.

Kaggle's free GPU is two T4s. Starting worker processes from inside a Jupyter kernel (mp.spawn,
notebook launchers) hangs there; running torchrun as a subprocess, as ``!torchrun ...`` would, is
what works. So `launch` writes the config where the workers can read it, runs

    python -m xrai.train.launcher --standalone --nproc_per_node N -m xrai train --config FILE --out RUN_DIR [...]

streams its output into the cell, and reads the result back from the run folder. With one GPU or
none it calls `xrai.train.trainer.fit` in the kernel instead.

``python -m xrai.train.launcher`` is torchrun itself (``torch.distributed.run``'s parse_args and run, so every
torchrun option works), except for how it ends when a worker fails: one line naming the first rank that
failed and its exit code, instead of torchrun's report. torchrun stops the other workers as soon as one
fails, so a rank that dies never leaves the others waiting.
"""

from __future__ import annotations

import codecs
import collections
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import IO, TYPE_CHECKING

from torch.distributed import run as torch_run
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

from xrai.data import load, read_manifest, save_manifest
from xrai.data.batches import per_rank_batch
from xrai.env import gpu_count
from xrai.errors import UserError
from xrai.runs.layout import CONFIG_JSON, RunFolder
from xrai.train.distributed import world_size_from_env
from xrai.train.trainer import FitResult, fit, load_result

if TYPE_CHECKING:
    import pandas as pd

    from xrai.config import TrainConfig

__all__ = ["FAILED_PREFIX", "LaunchError", "failure_line", "launch", "resolve_nproc", "run_torchrun",
           "split_torchrun_argv", "torchrun_command", "torchrun_main"]

FAILED_PREFIX = "xrai.train.launcher: failed:"  # the line torchrun_main ends with when a worker failed
# xrai.cli.commands's one-line errors ("xrai train [rank 1]: ... (-v shows the traceback)")
_ONE_LINE = re.compile(r"^xrai \w+(?: \[rank (\d+)\])?: (.+?)(?: \(-v shows the traceback\))?$")
_EXCEPTION = re.compile(r"^[A-Za-z_][\w.]*(?:Error|Exception|Interrupt)(?:: .+)?$")  # a traceback's last line
_RANK_PREFIX = re.compile(r"^(?:\[(?:rank|default)(\d+)\]:\s*)+")  # torch's "[rank1]: " on a rank's traceback
_TAIL_LINES = 400  # output lines kept to find the error in


class LaunchError(UserError, RuntimeError):
    """Training under torchrun failed; the message names the rank and its error in one line."""


def resolve_nproc(nproc: int | str, device: str = "auto") -> int:
    """The number of processes to start: an integer >= 1, or "auto" (every visible GPU; 1 without one).

    Raises:
        ValueError: not "auto" nor a positive integer, or more processes than GPUs for a CUDA device.
    """
    gpus = gpu_count()
    on_gpu = (device or "auto") in ("auto", "cuda") and gpus > 0
    if isinstance(nproc, str) and nproc.strip().lower() == "auto":
        return gpus if on_gpu else 1
    try:
        count = int(nproc)
    except (TypeError, ValueError):
        raise ValueError(f"nproc must be 'auto' or a number of processes >= 1, got {nproc!r}") from None
    if count < 1 or isinstance(nproc, bool):
        raise ValueError(f"nproc must be 'auto' or a number of processes >= 1, got {nproc!r}")
    if on_gpu and count > gpus:
        raise ValueError(f"nproc {count} but this machine shows {gpus} GPU(s): one process per GPU, so use "
                         f"nproc <= {gpus} ('auto'), or device 'cpu' to train on CPU processes")
    return count


def torchrun_command(nproc: int, args: list[str]) -> list[str]:
    """The command that runs `args` (``-m xrai train ...`` or a script and its arguments) in nproc processes
    on this machine: torchrun's --standalone rendezvous (a free local port)."""
    return [sys.executable, "-m", "xrai.train.launcher", "--standalone", "--nproc_per_node", str(int(nproc)), *args]


def run_torchrun(command: list[str], *, echo: IO[str] | None = None, env: dict[str, str] | None = None,
                 timeout: float | None = None) -> None:
    """Run a torchrun command, copying its output to `echo` as it comes (progress bars included).

    Interrupting (Ctrl-C, a notebook's stop button) stops torchrun and its workers before re-raising.

    Args:
        timeout: seconds after which torchrun and its workers are stopped (None: no limit).
    Raises:
        LaunchError: a non-zero exit, one line naming the failed rank, its exit code and its error; or
            the timeout ran out.
    """
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                               start_new_session=True)  # its own process group: stopped as one below
    expired, timer = threading.Event(), None
    if timeout is not None:
        timer = threading.Timer(timeout, lambda: (expired.set(), _stop(process)))
        timer.daemon = True
        timer.start()
    tail: collections.deque[str] = collections.deque(maxlen=_TAIL_LINES)
    pending, decoder = "", codecs.getincrementaldecoder("utf-8")(errors="replace")  # a chunk may end mid-character
    try:
        assert process.stdout is not None
        while chunk := os.read(process.stdout.fileno(), 65536):
            text = decoder.decode(chunk)
            if echo is not None:
                echo.write(text)
                echo.flush()
            lines = (pending + text).replace("\r", "\n").split("\n")
            pending = lines.pop()
            tail.extend(line for line in lines if line.strip())
        code = process.wait()
    except BaseException:
        _stop(process)
        raise
    finally:
        if timer is not None:
            timer.cancel()
        if process.stdout is not None:
            process.stdout.close()
    if pending.strip():
        tail.append(pending)
    if expired.is_set():
        raise LaunchError(f"torchrun did not finish within {timeout:g} s and was stopped")
    if code != 0:
        raise LaunchError(failure_line(list(tail), code, nproc=_nproc_of(command)))


def failure_line(lines: list[str], code: int, *, nproc: int | None = None) -> str:
    """One line saying why a torchrun run failed, from the end of its output.

    The first failed rank comes from torchrun_main's last line; its error from that rank's one-line
    message (xrai's CLI) or the last line of its traceback (torch prefixes those with "[rankN]:"). A
    rank that only stopped because another failed never stands for the failure.
    """
    who = next((m for line in reversed(lines) if (m := line.strip()).startswith(FAILED_PREFIX)), "")
    who = who[len(FAILED_PREFIX):].strip()
    failed = re.match(r"rank (\d+)", who)
    messages, errors = [], []  # (rank or None, text)
    for line in lines:
        prefix = _RANK_PREFIX.match(line)
        text = line[prefix.end():].strip() if prefix else line.strip()
        if one := _ONE_LINE.match(text):
            messages.append((one.group(1), one.group(2)))
        elif _EXCEPTION.match(text):
            errors.append((prefix.group(1) if prefix else None, text))
    own = [(r, m) for r, m in messages if "stops too" not in m]  # a PeerFailedError repeats rank 0's error
    rank = failed.group(1) if failed else None
    reason = next((m for r, m in own if r == rank), "") or next((e for r, e in reversed(errors) if r == rank), "")
    reason = reason or next((m for _, m in own + messages), "") or next((e for _, e in reversed(errors)), "")
    processes = f" on {nproc} processes" if nproc else ""
    return (f"training{processes} failed ({who or f'exit code {code}'}): "
            + (reason or "no error message; the output above says what happened"))


def launch(config: TrainConfig, run_dir: str | os.PathLike, *, nproc: int | str = "auto",
           manifest: pd.DataFrame | None = None, resume: bool = False, progress: bool = True) -> FitResult:
    """Train with every GPU there is: torchrun in a subprocess for several, `fit` in this process for one or none.

    Args:
        config: the run's settings (config.batch_size is the global batch, shared among the processes).
        run_dir: the run folder.
        nproc: processes to start, or "auto" (one per visible GPU; 1 on a CPU-only machine).
        manifest: the manifest to train on; None: RUN_DIR/manifest.csv, else config.data loaded. torchrun's
            workers read RUN_DIR/manifest.csv when there is one, as `python -m xrai train` does.
        resume: continue from checkpoints/last.pt.
        progress: show the progress (with several processes: rank 0's output, streamed).
    Returns:
        The FitResult `fit` returns, read back from the run folder when torchrun trained.
    Raises:
        LaunchError: a rank failed (one line: which rank, its exit code, its error); the others were stopped.
        ValueError: nproc or batch_size that cannot be used; whatever `fit` raises with one process.
    """
    run_dir = Path(run_dir)
    count = resolve_nproc(nproc, config.device)
    if count == 1 or world_size_from_env() > 1:  # one process, or already one rank of a torchrun
        if manifest is None and RunFolder(run_dir).manifest_csv.is_file():
            manifest = read_manifest(run_dir)
        elif manifest is None:
            manifest = load(config.data, root=config.root, seed=config.seed, val_fraction=config.val_fraction,
                            test_fraction=config.test_fraction, progress=progress)
        return fit(config, manifest, run_dir, resume=resume, progress=progress)
    per_rank_batch(config.batch_size, count)  # refused here, before any process starts

    with tempfile.TemporaryDirectory(prefix="xrai-launch-") as tmp:
        config_path = Path(tmp) / CONFIG_JSON
        config_path.write_text(config.to_json() + "\n", encoding="utf-8")
        args = ["-m", "xrai", "train", "--config", str(config_path), "--out", str(run_dir)]
        if manifest is not None and not RunFolder(run_dir).manifest_csv.is_file():
            # the workers read it; fit() copies it into run_dir (no split_images.zip: a folder no notebook reads)
            save_manifest(manifest, Path(tmp) / "manifest", keep_split_images=False)
            args += ["--manifest", str(Path(tmp) / "manifest")]
        if resume:
            args.append("--resume")
        run_torchrun(torchrun_command(count, args), echo=sys.stdout if progress else None)
    return load_result(run_dir)


def torchrun_main(argv: list[str]) -> int:
    """torchrun (``torch.distributed.run``) with `argv`; returns its exit status.

    A failed worker ends it with one line, FAILED_PREFIX and the first failed rank with its exit code
    (or signal), and status 2 when that rank exited with 2 (a user's error), else 1; torchrun has
    stopped the other workers by then.
    """
    head, script_args = split_torchrun_argv(argv)
    args = torch_run.parse_args(head)
    args.training_script_args = script_args
    try:
        torch_run.run(args)
    except ChildFailedError as error:
        rank, failure = error.get_first_failure()
        code = failure.exitcode
        how = f"exit code {code}" if code >= 0 else f"killed by {_signal_name(-code)}"
        print(f"{FAILED_PREFIX} rank {rank}, {how}", file=sys.stderr, flush=True)
        return 2 if code == 2 else 1
    return 0


# torchrun's options that take no value; every other option of it takes one (or is written --opt=value).
_TORCHRUN_FLAGS = {"-h", "--help", "--standalone", "-m", "--module", "--no-python", "--no_python", "--run-path",
                   "--run_path", "--virtual-local-rank", "--virtual_local_rank"}


def split_torchrun_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """(torchrun's options and the script or module, the script's own arguments).

    torchrun's parser also reads the script's arguments, and stops at any that abbreviates two of its
    options: ``-m xrai train --monitor loss`` fails there (``--monitor`` could be --monitor-interval or
    --monitor_interval). Splitting first leaves the script's arguments alone.
    """
    i = 0
    while i < len(argv):
        token = argv[i]
        if token == "--" or not token.startswith("-"):
            i += token == "--"
            return argv[: i + 1], argv[i + 1 :]
        i += 1 if ("=" in token or token in _TORCHRUN_FLAGS) else 2
    return argv, []


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _nproc_of(command: list[str]) -> int | None:
    for flag in ("--nproc_per_node", "--nproc-per-node"):
        if flag in command[:-1]:
            value = command[command.index(flag) + 1]
            return int(value) if value.isdigit() else None
    return None


def _stop(process: subprocess.Popen) -> None:
    """End torchrun and its workers (one process group): SIGTERM, then SIGKILL after 30 s."""
    if process.poll() is not None:
        return
    if not hasattr(os, "killpg"):  # Windows: torchrun alone (it ends its workers on the way out)
        process.terminate()
        process.wait()
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    except ProcessLookupError:
        pass


if __name__ == "__main__":
    sys.exit(torchrun_main(sys.argv[1:]))
