"""Griffe extensions for the API reference (loaded from mkdocs.yml).

- `LazyExports`: `keras_rnn_lora.translation` loads its public names on
  first use (a module `__getattr__` over its `_LAZY` table), so Griffe finds
  none of them in the module. Each becomes an alias of the object it loads,
  so that `::: keras_rnn_lora.translation.translate` works. A name the
  module already has is left alone.
- `OneEntryPerName`: an `Args:` entry that names several parameters
  (`a, b: as for ...`, the names possibly wrapped over two lines) becomes
  one entry per name, so that every parameter gets its own row.
"""

import importlib
import re

import griffe

PACKAGE = "keras_rnn_lora"
LAZY_MODULES = ("translation",)
NAME = re.compile(r"\*{0,2}[A-Za-z_]\w*")


class LazyExports(griffe.Extension):
    def on_package(self, *, pkg, **kwargs):
        if pkg.name != PACKAGE:
            return
        for name in LAZY_MODULES:
            module = pkg.get_member(name)
            table = getattr(
                importlib.import_module(f"{PACKAGE}.{name}"), "_LAZY", {}
            )
            for public, submodule in table.items():
                if public not in module.members:
                    target = f"{module.path}.{submodule}.{public}"
                    module.set_member(
                        public, griffe.Alias(public, target, parent=module)
                    )


def one_entry_per_name(text):
    """`text` (a docstring) with grouped `Args:` entries split up."""
    lines = text.split("\n")
    out = []
    index = 0
    while index < len(lines):
        out.append(lines[index])
        index += 1
        if out[-1].strip() not in ("Args:", "Arguments:"):
            continue
        section = len(out[-1]) - len(out[-1].lstrip())
        items = []  # each: the lines of one entry
        while index < len(lines) and (
            not lines[index].strip()
            or len(lines[index]) - len(lines[index].lstrip()) > section
        ):
            line = lines[index]
            indent = len(line) - len(line.lstrip())
            if line.strip() and (not items or indent <= items[0][1]):
                items.append([line, indent])
            elif items:
                items[-1][0] += "\n" + line
            else:
                out.append(line)
            index += 1
        out.extend(_split_items(items))
    return "\n".join(out)


def _split_items(items):
    merged = []
    for text, _indent in items:
        previous = merged[-1] if merged else None
        if (
            previous is not None
            and "\n" not in previous
            and ":" not in previous
            and previous.rstrip().endswith(",")
        ):
            merged[-1] = f"{previous.rstrip()} {text.strip()}"
        else:
            merged.append(text)
    out = []
    for text in merged:
        head, _, rest = text.partition(":")
        names = [n.strip() for n in head.split(",") if n.strip()]
        pad = text[: len(text) - len(text.lstrip())]
        if len(names) > 1 and all(NAME.fullmatch(n) for n in names):
            out.extend(f"{pad}{name}:{rest}" for name in names)
        else:
            out.append(text)
    return out


class OneEntryPerName(griffe.Extension):
    def on_instance(self, *, obj, **kwargs):
        if obj.docstring is not None and "," in obj.docstring.value:
            obj.docstring.value = one_entry_per_name(obj.docstring.value)
