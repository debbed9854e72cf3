"""Each package's `__all__` is sorted, names only what exists, and misses nothing public.

In the style of httpx's tests/test_exported_members.py.
"""

from __future__ import annotations

import types

import pytest

import events
import schemas
import service

PACKAGES = [service, events, schemas]


def own_public_members(module: types.ModuleType) -> list[str]:
    """Public names bound in the package that come from this project's own code.

    Submodules are reached by import, not export; helpers imported from the standard library
    or dependencies (`typing.Any`, ...) are not part of the surface.
    """
    ours = {m.__name__ for m in PACKAGES}
    names = []
    for name, value in vars(module).items():
        if name.startswith("_") or isinstance(value, types.ModuleType):
            continue
        origin = getattr(value, "__module__", None)
        if isinstance(origin, str) and origin.split(".")[0] in ours:
            names.append(name)
    return names


@pytest.mark.parametrize("module", PACKAGES, ids=lambda m: m.__name__)
def test_all_is_a_sorted_list_without_duplicates(module: types.ModuleType) -> None:
    exported = module.__all__  # every package declares its surface
    assert isinstance(exported, list)
    assert all(isinstance(name, str) for name in exported)
    assert exported == sorted(exported)
    assert len(set(exported)) == len(exported)


@pytest.mark.parametrize("module", PACKAGES, ids=lambda m: m.__name__)
def test_every_exported_name_exists_on_the_package(module: types.ModuleType) -> None:
    missing = [name for name in module.__all__ if not hasattr(module, name)]
    assert missing == []


@pytest.mark.parametrize("module", PACKAGES, ids=lambda m: m.__name__)
def test_every_public_name_of_the_package_is_exported(module: types.ModuleType) -> None:
    unexported = set(own_public_members(module)) - set(module.__all__)
    assert unexported == set()


def test_star_import_gives_exactly_the_exported_names() -> None:
    for module in PACKAGES:
        namespace: dict[str, object] = {}
        exec(f"from {module.__name__} import *", namespace)
        namespace.pop("__builtins__", None)
        assert sorted(namespace) == sorted(module.__all__)


def test_the_in_process_api_is_exported_from_service() -> None:
    for name in ("SecretsManager", "Secret", "SecretData", "Settings", "SecretsError"):
        assert name in service.__all__
