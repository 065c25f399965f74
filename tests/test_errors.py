"""Every project-defined exception derives from mask.errors.MaskError (the one class a job maps to a line)."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import mask
from mask.errors import MaskError


def _modules():
    for info in pkgutil.walk_packages(mask.__path__, "mask."):
        yield importlib.import_module(info.name)


def test_every_project_exception_derives_from_mask_error():
    found, outside = [], []
    for mod in _modules():
        for name, obj in vars(mod).items():
            if inspect.isclass(obj) and issubclass(obj, BaseException) and obj.__module__ == mod.__name__:
                found.append(f"{mod.__name__}.{name}")
                if not issubclass(obj, MaskError):
                    outside.append(f"{mod.__name__}.{name}")
    assert len(found) >= 29, found
    assert outside == [], f"exceptions not deriving from MaskError: {outside}"


def test_value_errors_stay_value_errors():
    from mask.config import ConfigError
    from mask.datasets.records import DatasetError
    from mask.storage import ArtifactNotFound, StorageError

    for cls in (ConfigError, DatasetError, StorageError, ArtifactNotFound):
        assert issubclass(cls, ValueError) and issubclass(cls, MaskError)
        assert cls.exit_code == 2
    from mask.losses import NonFiniteLoss

    assert issubclass(NonFiniteLoss, FloatingPointError) and NonFiniteLoss.exit_code == 1
