"""Distributed execution: process groups from the plan, expert-parallel all-to-all, data
parallel gradient reduction and the torchrun-style launcher.

Torch provides the engine (c10d collectives, DDP, the elastic launcher); this package adds
only what torch lacks: expert dispatch and the expert/dense split of gradient reduction.
See DESIGN.md beside this file for the step-by-step permutation.
"""
