"""modules.sd_hijack: cross-attention optimizations (recorded)."""

from modules import calls


def undo_optimizations():
    calls.append("undo_optimizations")


def apply_optimizations(option=None):
    calls.append("apply_optimizations")
    return "stand-in"
