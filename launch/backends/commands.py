"""Building the trainer's command line, and the one shell string sent to remote workers."""

from __future__ import annotations

import shlex
from importlib import metadata

# What a worker must run as the launching machine does: the suite's JAX stack, pinned to the
# versions installed here (the versions the study was checked with), JAX with its TPU extra.
PINNED = ("jax", "flax", "optax", "orbax-checkpoint", "numpy", "ml-collections")


def config_flags(overrides: dict) -> list[str]:
    """`--config.key=value` arguments; values as config.apply_overrides parses them back."""
    return [f"--config.{key}={value}" for key, value in overrides.items()]


def trainer_args(python: str, plan, member) -> list[str]:
    """`python -m launch.cli run STUDY` with the member's overrides, then the sweep's.

    The same order as launch/config.study_sweep applies them, so the run id
    computed on the worker is the member's run id here.
    """
    return (
        [python, "-m", "launch.cli", "run", plan.study]
        + config_flags(member.overrides)
        + config_flags(plan.overrides)
    )


def remote_shell(directory: str, args: list[str], env: dict[str, str] | None = None) -> str:
    """`cd DIR && [K=V ...] ARGS...` with every value quoted for the remote POSIX shell."""
    assignments = [f"{key}={shlex.quote(value)}" for key, value in (env or {}).items()]
    return f"cd {shlex.quote(directory)} && " + " ".join(
        assignments + [shlex.quote(a) for a in args]
    )


def worker_requirements() -> list[str]:
    """pip requirements for a TPU worker: the suite's stack at this machine's versions
    (`jax[tpu]==0.10.2`, ...), and gcsfs, through which etils and orbax reach gs://."""
    pins = []
    for name in PINNED:
        try:
            version = metadata.version(name)
        except metadata.PackageNotFoundError:  # not installed here: leave it to pip
            pins.append("jax[tpu]" if name == "jax" else name)
            continue
        pins.append(f"jax[tpu]=={version}" if name == "jax" else f"{name}=={version}")
    return pins + ["gcsfs"]


def worker_install(python: str) -> list[str]:
    """`python -m pip install -q -e . <worker_requirements()>`."""
    return [python, "-m", "pip", "install", "-q", "-e", ".", *worker_requirements()]
