"""Turning configured policy specs into policy instances, checked at start-up.

A spec names a class by dotted path (``amm_service.policies.reduce_replicas.ReduceReplicas`` or a
third party's ``mypkg.MyPolicy``) with keyword arguments. Built-ins may also be named by their
short class name. An unknown class or bad kwargs stops the AMM at start-up with a message that
says what was wrong and lists the built-ins. Two instances of one class get distinct names.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping

from amm_service.policies.base import Policy

BUILTINS: Mapping[str, str] = {
    "ReduceReplicas": "amm_service.policies.reduce_replicas.ReduceReplicas",
    "Rebalance": "amm_service.policies.rebalance.Rebalance",
    "Replicate": "amm_service.policies.replication.Replicate",
    "RetireWorker": "amm_service.policies.retire_worker.RetireWorker",
    "PauseToRetire": "amm_service.policies.pause_to_retire.PauseToRetire",
}


class PolicyError(ValueError):
    """A configured policy cannot be loaded."""


def resolve(class_path: str) -> type:
    """The class named by ``class_path`` (a dotted path, or the short name of a built-in)."""
    path = BUILTINS.get(class_path, class_path)
    module_name, _, attr = path.rpartition(".")
    if not module_name:
        raise PolicyError(
            f"unknown policy {class_path!r}: give a dotted path (package.module.Class) "
            f"or one of the built-ins: {', '.join(sorted(BUILTINS))}"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise PolicyError(f"cannot import policy module {module_name!r}: {err}") from err
    except Exception as err:
        raise PolicyError(
            f"importing policy module {module_name!r} failed: {type(err).__name__}: {err}"
        ) from err
    cls = getattr(module, attr, None)
    if not isinstance(cls, type):
        raise PolicyError(
            f"unknown policy {class_path!r}: module {module_name!r} has no class {attr!r}"
        )
    return cls


def build(class_path: str, kwargs: Mapping[str, object], taken: set[str]) -> Policy:
    """Instantiate one policy; ``taken`` holds the names already used and receives this one."""
    cls = resolve(class_path)
    try:
        policy = cls(**kwargs)
    except TypeError as err:
        raise PolicyError(f"invalid arguments for policy {class_path!r}: {err}") from err
    except ValueError as err:
        raise PolicyError(f"invalid configuration for policy {class_path!r}: {err}") from err
    except Exception as err:
        raise PolicyError(
            f"creating policy {class_path!r} failed: {type(err).__name__}: {err}"
        ) from err
    if not isinstance(policy, Policy) or not isinstance(getattr(policy, "name", None), str):
        raise PolicyError(
            f"{class_path!r} is not a policy: it needs a `name` string attribute and a "
            "`run(view, pending, measure)` method"
        )
    base = policy.name or cls.__name__
    name, n = base, 1
    while name in taken:
        n += 1
        name = f"{base}#{n}"
    policy.name = name
    taken.add(name)
    return policy


def build_all(specs: list[tuple[str, Mapping[str, object]]]) -> list[Policy]:
    taken: set[str] = set()
    return [build(path, kwargs, taken) for path, kwargs in specs]
