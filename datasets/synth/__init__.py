"""Synthetic battery-production images with pixel masks: electrode tiles, cell side
views and large line-scan electrode frames. Deterministic for a given seed."""

from cellinspect.datasets.synth.cell import CELL_CLASSES, generate_cell
from cellinspect.datasets.synth.electrode import ELECTRODE_CLASSES, generate_electrode
from cellinspect.datasets.synth.frame import generate_frame
from cellinspect.datasets.synth.writer import GENERATOR_VERSION, SynthKind, write_synthetic

__all__ = [
    "CELL_CLASSES",
    "ELECTRODE_CLASSES",
    "GENERATOR_VERSION",
    "SynthKind",
    "generate_cell",
    "generate_electrode",
    "generate_frame",
    "write_synthetic",
]
