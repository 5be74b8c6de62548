"""Machinery shared by the patches: a version gate, reversible attribute swaps, wrapper bookkeeping.

Rules every patch in this package follows:
- it names the upstream version(s) it was written and tested against, and `require_tested_version` raises
  `UntestedVersionError` on any other version (a patch of internals that silently misses its target is
  worse than none);
- it swaps attributes through `AttributeSwaps`, which refuses targets that do not exist and restores
  every original on `undo()`;
- it wraps upstream functions (`mark_wrapper`: the wrapper keeps a reference to what it wraps and calls
  it) instead of replacing them with copies of their bodies.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import sys
from collections.abc import Callable, Iterable

_WRAPPED = "__longgen_wrapped__"


class UntestedVersionError(RuntimeError):
    """A patch was asked to apply to an upstream version it was not tested with."""


class PatchTargetError(RuntimeError):
    """A patch target (module, class or attribute) does not exist in the installed upstream version."""


def installed_version(package: str) -> str:
    return importlib.metadata.version(package)


def require_tested_version(*, patch: str, package: str, tested: Iterable[str]) -> str:
    """Return the installed version of `package`; raise UntestedVersionError unless it is in `tested`."""
    tested = tuple(tested)
    version = installed_version(package)
    if version not in tested:
        raise UntestedVersionError(
            f"{patch} changes {package} internals and was tested with {package} "
            f"{' and '.join(tested)} only; this environment has {package} {version}. Install a tested "
            f"version (pip install '{package}=={tested[-1]}'), or check the patch against {version} "
            "and add it to the tested versions in megatron_longgen/patches/."
        )
    return version


def mark_wrapper(wrapper: Callable, original: Callable) -> Callable:
    """Record that `wrapper` wraps `original` (for `unwrap` and for tests)."""
    setattr(wrapper, _WRAPPED, original)
    return wrapper


def unwrap(fn: Callable) -> Callable:
    """The upstream function under any number of our wrappers."""
    while hasattr(fn, _WRAPPED):
        fn = getattr(fn, _WRAPPED)
    return fn


def resolve(path: str) -> tuple[object, str]:
    """'pkg.module:Class.attr' or 'pkg.module:attr' -> (owner object, attribute name). Imports the module."""
    module_name, _, qualname = path.partition(":")
    try:
        owner = importlib.import_module(module_name)
    except ImportError as err:
        raise PatchTargetError(f"patch target module {module_name} cannot be imported: {err}") from err
    *parents, name = qualname.split(".")
    for parent in parents:
        if parent not in vars(owner):
            raise PatchTargetError(f"patch target {path}: {owner.__name__} has no {parent}")
        owner = vars(owner)[parent]
    return owner, name


class AttributeSwaps:
    """Reversible `setattr`s on modules and classes; `undo()` restores the originals in reverse order.

    Only attributes defined on the owner itself (its `__dict__`) can be swapped: swapping an inherited
    one would shadow the base class instead of changing it, and a missing one means upstream changed.
    """

    def __init__(self) -> None:
        self._undo: list[tuple[object, str, object]] = []
        self._rebound: list[tuple[Callable, Callable]] = []

    def __len__(self) -> int:
        return len(self._undo)

    def replace(self, owner: object, name: str, value: object) -> object:
        """Set owner.name = value; return the previous value (as stored: staticmethod/classmethod kept)."""
        if name not in vars(owner):
            where = getattr(owner, "__qualname__", getattr(owner, "__name__", repr(owner)))
            raise PatchTargetError(f"patch target {where}.{name} does not exist in the installed version")
        previous = vars(owner)[name]
        setattr(owner, name, value)
        self._undo.append((owner, name, previous))
        return previous

    def wrap(self, path: str, make_wrapper: Callable[[Callable], Callable]) -> None:
        """Replace the function at `path` by make_wrapper(function), here and in every loaded `megatron`
        module that imported the same function object (`from x import f [as g]`)."""
        owner, name = resolve(path)
        if name not in vars(owner):
            raise PatchTargetError(f"patch target {path} does not exist in the installed version")
        stored = vars(owner)[name]
        if isinstance(stored, (staticmethod, classmethod)):
            wrapped = type(stored)(mark_wrapper(make_wrapper(stored.__func__), stored.__func__))
            self.replace(owner, name, wrapped)
            return
        if not callable(stored):
            raise PatchTargetError(f"patch target {path} is not a function: {type(stored).__name__}")
        wrapper = mark_wrapper(make_wrapper(stored), stored)
        self.replace(owner, name, wrapper)
        if isinstance(owner, type):
            return  # methods are looked up through the class at call time
        self._rebound.append((wrapper, stored))
        for module, alias in _megatron_globals_holding(stored):
            self.replace(module, alias, wrapper)

    def undo(self) -> None:
        while self._undo:
            owner, name, previous = self._undo.pop()
            setattr(owner, name, previous)
        # A module imported while the patches were active imported the wrapper: give it the original.
        while self._rebound:
            wrapper, original = self._rebound.pop()
            for module, alias in _megatron_globals_holding(wrapper):
                setattr(module, alias, original)


def _megatron_globals_holding(obj: object) -> list[tuple[object, str]]:
    found = []
    for module in list(sys.modules.values()):
        if not getattr(module, "__name__", "").startswith("megatron."):
            continue
        for alias, value in list(vars(module).items()):
            if value is obj:
                found.append((module, alias))
    return found
