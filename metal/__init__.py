"""Metal Shading Language sources for the MXFP4 MoE kernels (package data, see kernels.py)."""
