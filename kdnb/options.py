"""Options passed on by name (``--model-arg``, ``--data-arg``): checked against what takes them.

A model option goes to the smp network's constructor and a dataset option to the
dataset's; both swallow or misread what they do not expect (smp passes unknown keywords to
an encoder that ignores them), so a typo would train with the default and be recorded in
``config.json`` as if it had been used. :func:`check_options` compares the options with the
keyword parameters of the functions that receive them (:func:`keyword_parameters`) before
anything is built: an unknown name is refused with the valid names listed, and a value of
the wrong type (``size=abc`` where an integer goes) with the type it needs.
"""
from __future__ import annotations

import inspect
import json
import typing
from typing import Callable

__all__ = ["check_options", "keyword_parameters"]

#: The value types an option's annotation is checked against (others are passed on as given).
_CHECKED = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def keyword_parameters(*functions: Callable, skip: tuple[str, ...] = ()
                       ) -> dict[str, tuple[object, object]]:
    """The parameters that can be passed by name to any of ``functions`` (those with a
    default), each as ``(annotation, default)``, the annotation resolved (``object`` where
    it has none)."""
    accepted = {}
    for fn in functions:
        try:
            hints = typing.get_type_hints(fn)
        except Exception:  # an annotation that does not resolve here: leave those unchecked
            hints = {}
        for name, param in inspect.signature(fn).parameters.items():
            if (param.kind in (param.POSITIONAL_OR_KEYWORD, param.KEYWORD_ONLY)
                    and param.default is not param.empty and name not in skip):
                accepted[name] = (hints.get(name, object), param.default)
    return accepted


def _need(hint) -> tuple[tuple[type, ...], str] | None:
    """(the types a value may have, their name) for an annotation that is checked."""
    args = typing.get_args(hint)
    optional = type(None) in args
    if optional:
        rest = [a for a in args if a is not type(None)]
        hint = rest[0] if len(rest) == 1 else object
    if hint not in _CHECKED:
        return None
    types = (int, float) if hint is float else (hint,)
    name = _CHECKED[hint] if not optional else _CHECKED[hint].replace(" or ", ", ") + " or null"
    return types + ((type(None),) if optional else ()), name


def check_options(given: dict, accepted: dict[str, tuple[object, object]], *, what: str, flag: str,
                  fixed: dict[str, str] | None = None) -> None:
    """Refuses options that ``accepted`` (:func:`keyword_parameters`) does not name, and
    values whose type their annotation rules out.

    Args:
        given: the options (``cfg.model_kwargs``, ``cfg.data_kwargs``).
        accepted: name -> (annotation, default) of what the receiver takes.
        what: the receiver, for the message (``"model synth-student (smp FPN)"``).
        flag: where the options come from (``"--model-arg / model_kwargs"``).
        fixed: names the receiver takes but kdnb sets itself, each with who sets it.

    Raises:
        ValueError: naming the option, what is wrong and the valid names or type.
    """
    fixed = fixed or {}
    for name, value in given.items():
        if name in fixed:
            raise ValueError(f"{flag} {name}={value!r}: kdnb sets {name} for {what} itself "
                             f"({fixed[name]}); leave it out")
        if name not in accepted:
            raise ValueError(f"{flag} {name}={value!r}: {what} has no option {name!r}: check "
                             f"the spelling; it takes {', '.join(sorted(accepted))}")
        hint, default = accepted[name]
        need = _need(hint)
        if need is not None and (not isinstance(value, need[0])
                                 or (isinstance(value, bool) and bool not in need[0])):
            example = "true" if bool in need[0] else json.dumps(default, default=str)
            raise ValueError(f"{flag} {name}={value!r}: {what} takes {need[1]} for {name} (its "
                             f"default is {json.dumps(default, default=str)}): pass one, e.g. "
                             f"{name}={example}")
