"""meanflow_losses: training objectives for one- and few-step generative models.

Convention: t = 0 is data, t = 1 is noise, r <= t, z_r = z_t - (t - r) u.
Model protocol: ``model(z, r, t, **model_kwargs) -> u`` shaped like ``z``.
"""

from meanflow_losses import (
    adapters,
    couplings,
    diagnostics,
    diffusers,
    ema,
    finetune,
    forward_ad,
    jvp_attention,
    model_checks,
    presets,
    schedules,
    teachers,
)
from meanflow_losses._validate import value_checks
from meanflow_losses.conditioning import Conditioning, shared
from meanflow_losses.conventions import conditional_velocity, interpolate
from meanflow_losses.guidance import GuidanceAsInput, TrainingGuidance, null_class
from meanflow_losses.jvp import JVP_STRATEGIES, MissingTangentError, time_derivative
from meanflow_losses.jvp_attention import JVP_ATTENTION
from meanflow_losses.model_checks import MeanFlowWarning, check_model
from meanflow_losses.objectives import (
    AlphaFlowLoss,
    DyadicPairSampler,
    FlowMatchingLoss,
    LossOutput,
    MeanFlowLoss,
    NonFiniteError,
    ShortcutLoss,
    SplitMeanFlowLoss,
)
from meanflow_losses.registry import OBJECTIVES, make_objective, objective_class
from meanflow_losses.sampling import make_grid, sample
from meanflow_losses.teachers import Teacher
from meanflow_losses.times import DifficultyCurriculum, TimePair, TimePairSampler, TimeSampler
from meanflow_losses.weighting import AdaptiveWeight, MinSNRWeight, ProgressiveIntervalWeight

__version__ = "0.2.0"

__all__ = [
    "JVP_ATTENTION",
    "JVP_STRATEGIES",
    "OBJECTIVES",
    "AdaptiveWeight",
    "AlphaFlowLoss",
    "Conditioning",
    "DifficultyCurriculum",
    "DyadicPairSampler",
    "FlowMatchingLoss",
    "GuidanceAsInput",
    "LossOutput",
    "MeanFlowLoss",
    "MeanFlowWarning",
    "MinSNRWeight",
    "MissingTangentError",
    "NonFiniteError",
    "ProgressiveIntervalWeight",
    "ShortcutLoss",
    "SplitMeanFlowLoss",
    "Teacher",
    "TimePair",
    "TimePairSampler",
    "TimeSampler",
    "TrainingGuidance",
    "__version__",
    "adapters",
    "check_model",
    "conditional_velocity",
    "couplings",
    "diagnostics",
    "diffusers",
    "ema",
    "finetune",
    "forward_ad",
    "interpolate",
    "jvp_attention",
    "make_grid",
    "make_objective",
    "model_checks",
    "null_class",
    "objective_class",
    "presets",
    "sample",
    "schedules",
    "shared",
    "teachers",
    "time_derivative",
    "value_checks",
]
