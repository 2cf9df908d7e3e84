"""An MSL-on-CPU emulator for mx.fast.metal_kernel kernels (see emulator.py, msl_shim.h, runtime.h)."""
