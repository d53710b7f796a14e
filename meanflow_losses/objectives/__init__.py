"""Objectives: one module per family, each a thin composition of the primitives."""

from meanflow_losses.objectives.alphaflow import AlphaFlowLoss
from meanflow_losses.objectives.base import LossOutput, NonFiniteError
from meanflow_losses.objectives.flow_matching import FlowMatchingLoss
from meanflow_losses.objectives.meanflow import MeanFlowLoss
from meanflow_losses.objectives.splitting import DyadicPairSampler, ShortcutLoss, SplitMeanFlowLoss

__all__ = [
    "AlphaFlowLoss",
    "DyadicPairSampler",
    "FlowMatchingLoss",
    "LossOutput",
    "MeanFlowLoss",
    "NonFiniteError",
    "ShortcutLoss",
    "SplitMeanFlowLoss",
]
