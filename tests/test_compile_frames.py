"""Every helper whose behaviour depends on torch.compiler.is_compiling() is marked
``inline_only`` (python/tbkernels/ops/_compile.py): compiled as a frame of its own (which
Dynamo does for functions called from a frame it runs eagerly) it would skip its value check on
real tensors. Public entry points may be compiled as frames: their compiled path is a real one."""
from __future__ import annotations

import ast
import importlib
import pathlib

import tbkernels
from tbkernels.ops import _compile

OPS = pathlib.Path(tbkernels.__file__).parent / "ops"
PUBLIC_ENTRY_POINTS = {"flow_grpo_loss", "dpo_backward"}
DEFS = (ast.FunctionDef, ast.AsyncFunctionDef)


def _own_calls(fn):
    """The names called in fn's own body (not in functions nested in it)."""
    names, todo = [], list(ast.iter_child_nodes(fn))
    while todo:
        node = todo.pop()
        if isinstance(node, DEFS):
            continue
        if isinstance(node, ast.Call):
            f = node.func
            names.append(f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", None))
        todo.extend(ast.iter_child_nodes(node))
    return names


def _helpers_consulting_is_compiling():
    """(module, qualified name, nested, decorated) of each function in tbkernels/ops whose own
    body calls is_compiling() (or dpo's _compiling())."""
    found = []
    for path in sorted(OPS.glob("*.py")):
        module = f"tbkernels.ops.{path.stem}"

        def visit(node, prefix, nested):
            for child in ast.iter_child_nodes(node):
                if isinstance(child, DEFS):
                    if {"is_compiling", "_compiling"} & set(_own_calls(child)):
                        decorated = any(
                            (d.attr if isinstance(d, ast.Attribute) else getattr(d, "id", None))
                            == "inline_only" for d in child.decorator_list)
                        found.append((module, prefix + child.name, nested, decorated))
                    visit(child, f"{prefix}{child.name}.<locals>.", True)
                elif isinstance(child, ast.ClassDef):
                    visit(child, f"{prefix}{child.name}.", nested)
                else:
                    visit(child, prefix, nested)
        visit(ast.parse(path.read_text()), "", False)
    return found


def test_every_is_compiling_helper_is_inline_only():
    found = _helpers_consulting_is_compiling()
    names = {f"{m}.{q}" for m, q, _, _ in found}
    assert "tbkernels.ops.flow_grpo._check_sigmas" in names          # the scan finds them
    assert "tbkernels.ops.dpo.dpo_backward.<locals>.warn_hooks" in names
    helpers = [(m, q, nested, dec) for m, q, nested, dec in found if q not in PUBLIC_ENTRY_POINTS]
    undecorated = [f"{m}.{q}" for m, q, _, dec in helpers if not dec]
    assert not undecorated, f"helpers consulting is_compiling() without @inline_only: {undecorated}"
    # and the decorator ran (at import for module-level functions; nested ones each call)
    for m, _, _, _ in helpers:
        importlib.import_module(m)
    unmarked = [f"{m}.{q}" for m, q, nested, _ in helpers
                if not nested and f"{m}.{q}" not in _compile.MARKED]
    assert not unmarked, unmarked
