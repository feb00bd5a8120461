"""``pkg.module:factory`` targets: what a user's factory returns, as an ExportSpec."""

from __future__ import annotations

import importlib
import os
import sys

from torch import nn

from ._errors import ExportError
from ._hf import is_pretrained, spec_from_pretrained
from ._spec import ExportSpec, spec_from_module


def spec_from_factory(target: str):
    """Import ``pkg.module:factory`` and turn what it returns into an ExportSpec.

    The factory takes no arguments and returns an ExportSpec, or a tuple
    (module, example_inputs[, dynamic[, dims]]), or a dict with those keys (and optionally
    name, output_names, tolerance, value_ranges, cache, input_maker). A Hugging Face
    PreTrainedModel may come bare or without example inputs (export/_hf.py).
    """
    module_name, _, attr = target.partition(":")
    if not module_name or not attr:
        raise ExportError(f"target '{target}' is not of the form pkg.module:factory", stage=1)
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # as `python -m` does, so local modules import
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ExportError(f"cannot import '{target}': {err}", stage=1) from err
    if not callable(factory):
        raise ExportError(f"'{target}' is not callable", stage=1)
    made = factory()
    if isinstance(made, ExportSpec):
        return made
    if isinstance(made, nn.Module):
        made = {"module": made}  # a Hugging Face model needs no example inputs
    if isinstance(made, tuple):
        keys = ("module", "example_inputs", "dynamic", "dims")
        made = dict(zip(keys, made, strict=False))
    if not isinstance(made, dict) or "module" not in made:
        raise ExportError(
            f"factory '{target}' returned {type(made).__name__}; expected an ExportSpec, "
            "a (module, example_inputs[, dynamic[, dims]]) tuple or a dict",
            stage=1,
        )
    name = made.pop("name", None) or attr
    module = made.pop("module")
    cls = type(module)
    source = {"target": target, "class": f"{cls.__module__}.{cls.__qualname__}"}
    if is_pretrained(module):
        return spec_from_pretrained(
            module, made.pop("example_inputs", None), name=name, source=source, **made
        )
    if "example_inputs" not in made:
        raise ExportError(
            f"factory '{target}' returned a module without example inputs",
            stage=1,
            hint="return (module, example_inputs, dynamic) or a dict with those keys",
        )
    return spec_from_module(module, made.pop("example_inputs"), name=name, source=source, **made)
