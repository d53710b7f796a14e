"""Objectives: one module per family, each a thin composition of the primitives."""

from meanflow_losses.objectives.base import LossOutput
from meanflow_losses.objectives.flow_matching import FlowMatchingLoss
from meanflow_losses.objectives.meanflow import MeanFlowLoss

__all__ = ["FlowMatchingLoss", "LossOutput", "MeanFlowLoss"]
