"""The Kimad controller: bandwidth estimator, collective cost model, budgets, menus, allocators, plans.

Framework-free (no Horovod import), so every frontend shares it. The entry point is
:class:`Controller`; the parts are usable on their own:

* :class:`BandwidthEstimator` -- robust, forgetting least-squares fit of latency and bandwidth;
* :class:`CostModel` -- seconds of ring allreduce / allgather and of every wire format (:data:`TCP_ETHERNET_FRAMING`:
  wire bytes per payload byte of TCP over Ethernet);
* :class:`FixedBudget`, :class:`AutoBudget` -- seconds of communication allowed per step;
* :func:`build_menu` -- a tensor's options, priced in bytes, seconds and squared error;
* :func:`allocate_layerwise` (Kimad+, knapsack DP), :func:`allocate_lagrangian`, :func:`allocate_uniform` (Kimad);
* :func:`fill_budget` -- grows a plan's top-k entries by one factor into the budget it left unspent;
* :class:`Plan` -- the immutable, hashable result of one step.
"""

from kimad.control.allocate import Allocation, allocate_lagrangian, allocate_layerwise, allocate_uniform
from kimad.control.budget import AutoBudget, FixedBudget
from kimad.control.controller import Controller, ControllerError, TensorProfile, fill_budget
from kimad.control.cost import TCP_ETHERNET_FRAMING, CostModel
from kimad.control.estimator import BandwidthEstimate, BandwidthEstimator
from kimad.control.menu import Option, build_menu, geometric_densities
from kimad.control.plan import Plan, PlanEntry

__all__ = [
    "Allocation", "AutoBudget", "BandwidthEstimate", "BandwidthEstimator", "Controller", "ControllerError",
    "CostModel", "FixedBudget", "Option", "Plan", "PlanEntry", "TensorProfile", "allocate_lagrangian",
    "TCP_ETHERNET_FRAMING", "allocate_layerwise", "allocate_uniform", "build_menu", "fill_budget",
    "geometric_densities",
]
