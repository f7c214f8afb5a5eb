"""Install, remove or inspect the opt-in ``deep_ep`` alias of deepep_megatron.

    python -m deepep_megatron.deep_ep install [--target DIR]   # `import deep_ep` -> deepep_megatron
    python -m deepep_megatron.deep_ep uninstall [--target DIR]
    python -m deepep_megatron.deep_ep status                   # which deep_ep Python would import

``install`` writes a two-file package ``deep_ep`` into ``DIR`` (default: this interpreter's
site-packages) that hands ``import deep_ep`` to :mod:`deepep_megatron.deep_ep`. It refuses, and
changes nothing, when another ``deep_ep`` (DeepSeek's DeepEP) is importable or occupies ``DIR``:
the alias never shadows a real DeepEP. ``uninstall`` removes only a package this command wrote.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import sys
import sysconfig
from typing import Optional, Sequence

ALIAS_NAME = "deep_ep"
#: The file that marks a ``deep_ep`` folder as this command's alias (and not DeepSeek's package).
MARKER = "DEEPEP_MEGATRON_ALIAS"
ALIAS_SOURCE = '''"""`deep_ep` alias written by `python -m deepep_megatron.deep_ep install`: `import deep_ep` loads
deepep_megatron's DeepEP-compatible module (deep_ep.PROVIDER == "deepep_megatron"), not DeepSeek's DeepEP.
Remove it with `python -m deepep_megatron.deep_ep uninstall`."""
import sys

import deepep_megatron.deep_ep as _impl

sys.modules[__name__ + ".buffer"] = _impl.buffer
sys.modules[__name__ + ".utils"] = _impl.utils
sys.modules[__name__] = _impl
'''


def default_target() -> str:
    """This interpreter's site-packages (inside a virtualenv: the virtualenv's)."""
    return sysconfig.get_paths()["purelib"]


def is_alias(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, MARKER))


def importable_deep_ep() -> Optional[str]:
    """The folder (or file) ``import deep_ep`` would load now, without importing it; None if none."""
    spec = importlib.util.find_spec(ALIAS_NAME)
    if spec is None:
        return None
    if spec.submodule_search_locations:
        return list(spec.submodule_search_locations)[0]
    return spec.origin


def describe(location: Optional[str]) -> str:
    if location is None:
        return "no deep_ep is importable"
    if os.path.isdir(location) and is_alias(location):
        return f"deep_ep at {location} is deepep_megatron's alias (deep_ep.PROVIDER == 'deepep_megatron')"
    return f"deep_ep at {location} is not deepep_megatron's alias (DeepSeek's DeepEP or another package)"


def install(target: str) -> str:
    """Write the alias into ``target``; raise RuntimeError (changing nothing) where another deep_ep is."""
    folder = os.path.join(target, ALIAS_NAME)
    if os.path.exists(folder) and not is_alias(folder):
        raise RuntimeError(
            f"{folder} already holds a deep_ep that is not deepep_megatron's alias (DeepSeek's DeepEP?); the alias "
            "never replaces it. Keep using that DeepEP, or `pip uninstall deep_ep` first and run this again."
        )
    found = importable_deep_ep()
    if found is not None and os.path.realpath(found) != os.path.realpath(folder) and not (os.path.isdir(found) and is_alias(found)):
        raise RuntimeError(
            f"`import deep_ep` already loads {found}, which is not deepep_megatron's alias (DeepSeek's DeepEP?); the "
            "alias never shadows it. Keep using that DeepEP, or uninstall it first and run this again."
        )
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "__init__.py"), "w") as out:
        out.write(ALIAS_SOURCE)
    with open(os.path.join(folder, MARKER), "w") as out:
        out.write("written by `python -m deepep_megatron.deep_ep install`; removed by its `uninstall`\n")
    return folder


def uninstall(target: str) -> Optional[str]:
    """Remove the alias from ``target``; None when there was none. Raise RuntimeError for a foreign deep_ep."""
    folder = os.path.join(target, ALIAS_NAME)
    if not os.path.exists(folder):
        return None
    if not is_alias(folder):
        raise RuntimeError(f"{folder} is not deepep_megatron's alias (DeepSeek's DeepEP?); leaving it alone")
    shutil.rmtree(folder)
    return folder


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deepep_megatron.deep_ep", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("install", "uninstall", "status"), nargs="?", default="status")
    parser.add_argument("--target", default=None, help="folder on sys.path to write to (default: site-packages)")
    args = parser.parse_args(argv)
    target = args.target or default_target()
    try:
        if args.command == "install":
            print(f"installed the deep_ep alias at {install(target)}: `import deep_ep` now loads deepep_megatron")
        elif args.command == "uninstall":
            folder = uninstall(target)
            print(f"removed the deep_ep alias at {folder}" if folder else f"no deep_ep alias under {target}")
        else:
            print(describe(importable_deep_ep()))
    except RuntimeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
