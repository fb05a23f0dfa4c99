"""Fails when a `_`-prefixed name crosses a module boundary.

Checked in every Python file of the project (the package, examples,
benchmarks, tests and this folder):

- `from module import _name`;
- `something._name` where `something` is not `self` or `cls` (of the
  method it is used in), `super()`, or the module's own class, and `_name`
  is not defined in the same module: reading another module's private
  name, or another object's private attribute;
- `self._name` (or `cls`, `super()`) where the project never defines
  `_name`: a private name inherited from Keras.

The one module allowed to read Keras' private names is
`keras_rnn_lora/keras_internals.py`; its own attributes are checked like
anyone else's from outside it. `os._exit` is a documented public function.

    python .ci/check_private_names.py [ROOT]
"""

import ast
import pathlib
import sys

FOLDERS = ("keras_rnn_lora", "examples", "benchmarks", "tests", ".ci")
ALLOWED_FILES = {"keras_rnn_lora/keras_internals.py"}
ALLOWED_ACCESS = {"os._exit"}


def _private(name):
    return name.startswith("_") and not (
        name.startswith("__") and name.endswith("__")
    )


def _defined_names(trees):
    """Every `_`-prefixed name the project defines: functions, classes,
    assigned attributes and names."""
    names = set()
    for tree in trees:
        for node in ast.walk(tree):
            if isinstance(
                node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
            ):
                names.add(node.name)
            elif isinstance(node, ast.Attribute) and isinstance(
                node.ctx, ast.Store
            ):
                names.add(node.attr)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                names.add(node.value)  # setattr/getattr by name
    return {name for name in names if _private(name)}


class _Checker(ast.NodeVisitor):
    def __init__(self, defined, local):
        self.defined = defined
        self.local = local  # the private names this module defines
        self.problems = []
        self.owners = []  # names that may read private attributes here
        self.classes = []

    def visit_ClassDef(self, node):
        self.classes.append(node.name)
        self.generic_visit(node)
        self.classes.pop()

    def _function(self, node):
        arguments = node.args.posonlyargs + node.args.args
        first = arguments[0].arg if arguments and self.classes else None
        self.owners.append({first} if first in ("self", "cls") else set())
        self.generic_visit(node)
        self.owners.pop()

    visit_FunctionDef = _function
    visit_AsyncFunctionDef = _function

    def visit_ImportFrom(self, node):
        for alias in node.names:
            if _private(alias.name):
                self.problems.append(
                    (node.lineno, f"imports {alias.name} from {node.module}")
                )

    def visit_Attribute(self, node):
        if _private(node.attr):
            value = node.value
            text = ast.unparse(node)
            owners = set().union(*self.owners) if self.owners else set()
            mine = isinstance(value, ast.Name) and (
                value.id in owners or value.id in self.classes
            )
            via_super = (
                isinstance(value, ast.Call)
                and isinstance(value.func, ast.Name)
                and value.func.id == "super"
            )
            local = node.attr in self.local
            if not (mine or via_super or local or text in ALLOWED_ACCESS):
                self.problems.append((node.lineno, f"reads {text}"))
            elif (mine or via_super) and node.attr not in self.defined:
                self.problems.append(
                    (node.lineno, f"reads Keras' private {text}")
                )
        self.generic_visit(node)


def check(root):
    trees = {}
    for folder in FOLDERS:
        for path in sorted((root / folder).rglob("*.py")):
            relative = path.relative_to(root).as_posix()
            trees[relative] = ast.parse(path.read_text(), relative)
    defined = _defined_names(
        tree
        for relative, tree in trees.items()
        if relative not in ALLOWED_FILES
    )
    problems = []
    for relative, tree in trees.items():
        if relative not in ALLOWED_FILES:
            checker = _Checker(defined, _defined_names([tree]))
            checker.visit(tree)
            problems += [
                f"{relative}:{line}: {what}" for line, what in checker.problems
            ]
    return problems


def main():
    root = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else ".")
    problems = check(root)
    for problem in problems:
        print(problem)
    if problems:
        print(
            f"{len(problems)} private name(s) cross a module boundary: give "
            "the owner a public name (Keras' private names belong in "
            "keras_rnn_lora/keras_internals.py)."
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
