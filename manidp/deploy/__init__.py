"""Deployment: compile a trained gated ResNet into a :class:`DynamicResNet` engine."""

from .backends import BackendUnavailable, available_backends, get_backend, register_backend
from .compile import compile, model_from_checkpoint
from .engine import DynamicResNet, EngineFormatError

__all__ = ["compile", "model_from_checkpoint", "DynamicResNet", "EngineFormatError", "BackendUnavailable",
           "available_backends", "get_backend", "register_backend"]
