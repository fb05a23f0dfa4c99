"""The paths the main job records: relative, never the machine's own.

`results.json` and `export.json` name every path relative to the output
folder that holds them, so a run folder read on another machine (or moved)
still makes sense and tells nothing of where it ran. The data folder is the
exception, since it lies elsewhere: it is named as it was given when that
was relative, relative to the repository when inside it, and otherwise by
its name alone (the content fingerprint recorded beside it identifies it).
"""

import os

REPOSITORY = os.path.dirname(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
)


def from_output(args, path):
    """`path` relative to the output folder."""
    return os.path.relpath(
        os.path.abspath(path), os.path.abspath(args.output_dir)
    )


def in_output(args, recorded):
    """The path a record names (relative to the output folder) as a path
    from here; a path recorded absolute stays as it is."""
    return os.path.join(args.output_dir, recorded)


def data_dir_name(data_dir):
    """How results.json names `--data-dir` (see the module)."""
    if not data_dir:
        return None  # the TFDS download
    if not os.path.isabs(data_dir):
        return os.path.normpath(data_dir)
    inside = os.path.relpath(os.path.abspath(data_dir), REPOSITORY)
    if not inside.startswith(os.pardir):
        return inside
    return os.path.basename(os.path.normpath(data_dir))


def recorded_settings(args):
    """`args` as results.json records them: every path relative."""
    settings = args.recorded()
    del settings["grids"]
    settings["output_dir"] = os.curdir
    settings["export_dir"] = from_output(args, args.export_dir)
    settings["data_dir"] = data_dir_name(args.data_dir)
    return settings
