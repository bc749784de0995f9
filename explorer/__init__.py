"""Decoding Explorer: run decoding strategies step by step and record every step."""

__version__ = "0.1.0"
