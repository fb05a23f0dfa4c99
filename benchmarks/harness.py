"""What every benchmark script shares: its command line, the backend, the
results file and its provenance, the Markdown table printed last, and
measurements run in a Python process of their own.

    import harness

    args = harness.parser(__doc__, rounds=7).parse_args()
    ...
    harness.write_results(f"my_benchmark_{harness.backend()}", results)
    harness.print_table(["mode", "step ms"], rows)

`write_results` writes `benchmarks/results/<name>.json` with a
`provenance` entry (the command, the date, the git commit and whether the
code differed from it, the versions of Python, Keras, NumPy, this library
and the backend's library, the CPU, its core count and any GPU), and keeps
paths in it relative to the repository.

`in_fresh_process` runs a measurement (peak memory, a cold start, a cold
compile) in a new interpreter that can `import harness` and the other
modules of this folder; the script hands its result back with `report`.
"""

import argparse
import datetime
import json
import os
import pathlib
import subprocess
import sys

BENCHMARKS = pathlib.Path(__file__).resolve().parent
ROOT = BENCHMARKS.parent
RESULTS = BENCHMARKS / "results"

#: What `report` prints before its JSON, for `in_fresh_process` to find.
RESULT_MARKER = "MEASURED "


# -- the command line ---------------------------------------------------------


def positive_int(text):
    """An `argparse` type: an integer of at least 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(
            f"expected an integer of at least 1, got {text!r}"
        )
    return value


def parser(doc, rounds=None, data_dir=False):
    """An `argparse.ArgumentParser` described by the script's docstring
    `doc`, with the options benchmark scripts share.

    Args:
        doc: the script's `__doc__`, shown by `--help`.
        rounds: the default of `--rounds` (the timed rounds, at least 1);
            `None` adds no `--rounds`.
        data_dir: whether to add `--data-dir`, the IWSLT 2017 folder
            (default: the `IWSLT2017_DIR` environment variable).
    """
    result = argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    if rounds is not None:
        result.add_argument(
            "--rounds",
            type=positive_int,
            default=rounds,
            help="timed rounds (default %(default)s)",
        )
    if data_dir:
        result.add_argument(
            "--data-dir",
            default=os.environ.get("IWSLT2017_DIR"),
            help="the IWSLT 2017 folder (default: $IWSLT2017_DIR)",
        )
    return result


def backend():
    """The Keras backend's name."""
    import keras

    return keras.backend.backend()


# -- provenance ---------------------------------------------------------------


def code_changed():
    """Whether tracked files differ from the commit, results aside (a run
    rewrites them); `None` outside a git checkout."""
    return _git_state()["uncommitted_changes"]


def _git_state():
    from keras_rnn_lora import measurement

    return measurement.git_state(
        ROOT, exclude=[RESULTS.relative_to(ROOT).as_posix()]
    )


def command_line():
    """This process' command, its paths relative to the repository."""
    return " ".join(
        relative_path(arg) if os.path.isabs(arg) else arg for arg in sys.argv
    )


def provenance():
    """Where a result comes from: the command, the date (UTC), the commit
    and whether the code differed from it, the backend, versions, device,
    and the speed-relevant environment (`measurement.speed_environment`)."""
    from keras_rnn_lora import measurement

    name = backend()
    return {
        "command": command_line(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds"
        ),
        **_git_state(),
        "backend": name,
        "versions": measurement.versions(name),
        "device": measurement.device(name),
        "environment": measurement.speed_environment(),
    }


# -- results ------------------------------------------------------------------


def relative_path(path):
    """`path` relative to the repository (`../` where it lies outside)."""
    return pathlib.Path(os.path.relpath(path, ROOT)).as_posix()


def relative_paths(value):
    """`value` (JSON-like) with every absolute path made relative to the
    repository: a string that is one, and the repository's own path
    inside any other string (a traceback, say)."""
    if isinstance(value, dict):
        return {key: relative_paths(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [relative_paths(item) for item in value]
    if isinstance(value, pathlib.PurePath):
        value = str(value)
    if not isinstance(value, str):
        return value
    if os.path.isabs(value) and "\n" not in value:
        return relative_path(value)
    return value.replace(f"{ROOT}{os.sep}", "")


def write_results(name, results, directory=RESULTS):
    """Writes `results` (a JSON-able dict) and its `provenance` to
    `<directory>/<name>.json`, paths relative to the repository, and says
    where.

    Returns:
        The file's path, relative to the repository.
    """
    content = relative_paths({**results, "provenance": provenance()})
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, f"{name}.json")
    with open(path, "w") as file:
        json.dump(content, file, indent=2)
        file.write("\n")
    shown = relative_path(path)
    print(f"wrote {shown}", flush=True)
    return shown


def read_results(name, directory=RESULTS):
    """The results `write_results` wrote under `name`, or `None`."""
    path = os.path.join(directory, f"{name}.json")
    if not os.path.exists(path):
        return None
    with open(path) as file:
        return json.load(file)


# -- the Markdown table ------------------------------------------------------


def median_range(summary, spec=".3f"):
    """A `measurement.summary` as `median (min-max)`."""
    return (
        f"{summary['median']:{spec}} "
        f"({summary['min']:{spec}}-{summary['max']:{spec}})"
    )


def table(header, rows, align=None):
    """A Markdown table: `header` cells, then `rows`; `align` is one letter
    a column, `l` or `r` (default: the first column left, the rest right).
    """
    align = align or "l" + "r" * (len(header) - 1)
    rules = {"l": "---", "r": "---:"}
    if len(align) != len(header) or set(align) - set(rules):
        raise ValueError(
            f"Expected one of 'l' or 'r' per column ({len(header)}), "
            f"received: align={align!r}"
        )
    lines = [
        "| " + " | ".join(map(str, header)) + " |",
        "|" + "|".join(rules[a] for a in align) + "|",
    ]
    for row in rows:
        row = list(row)
        if len(row) != len(header):
            raise ValueError(
                f"Expected {len(header)} cells a row, received {row}"
            )
        lines.append("| " + " | ".join(map(str, row)) + " |")
    return "\n".join(lines)


def print_table(header, rows, align=None, title=None):
    """Prints `table(header, rows, align)`, after a blank line and `title`
    where given."""
    print(f"\n{title}\n" if title else "")
    print(table(header, rows, align), flush=True)


# -- a measurement in a process of its own ----------------------------------


def report(value):
    """Prints `value` as JSON, marked for `in_fresh_process` to read back."""
    print(RESULT_MARKER + json.dumps(value), flush=True)


def in_fresh_process(script, *argv, timeout=900):
    """Runs the Python source `script` in a new interpreter (this one, this
    environment, with this folder importable; `argv` as `sys.argv[1:]`)
    and returns the value it passed to `report`.

    Raises:
        RuntimeError: the script reported nothing (it failed or timed
            out); the message ends with its stderr.
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(BENCHMARKS), env.get("PYTHONPATH")])
    )
    try:
        result = subprocess.run(
            [sys.executable, "-c", script, *map(str, argv)],
            capture_output=True,
            text=True,
            env=env,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as error:
        raise RuntimeError(
            f"The measurement did not finish within {timeout} s."
        ) from error
    for line in result.stdout.splitlines():
        if line.startswith(RESULT_MARKER):
            return json.loads(line[len(RESULT_MARKER) :])
    raise RuntimeError(
        f"The measurement reported no result (exit status "
        f"{result.returncode}). Its stderr ends:\n{result.stderr[-2000:]}"
    )
