"""What makes SED fast on CPUs: fused C++ kernels (`kernels`, `csrc/`), channels-last routes to
oneDNN (`layout`), conv1 through the FFT (`fft_conv`) and the allocator's settings (`allocator`).

The model never calls these directly: `sed_model.ops` decides, in one place, which implementation
of each step runs.
"""
