"""The old import path of `hgkernels.penalties.fishr`, kept for the tests that use it."""
from .penalties.fishr import FishrLoss, fishr_penalty, variance_distance

__all__ = ["FishrLoss", "fishr_penalty", "variance_distance"]
