"""``manidp.kernels``: the Triton kernels and ops, and what every kernel shares (docs/DESIGN.md 7).

``build_config`` (mode numbers and compiler flags of all kernels), ``fake`` (fake kernels of every
op), ``ops`` (the Triton ops), ``gate`` / ``gated_conv`` (the Triton kernels), ``_launch`` (how they
are built and launched), ``aot`` (their ahead-of-time compilation for sm_90 and what the machine
code says).  Importing the package imports none of them, so it needs neither triton nor the C++
extension.
"""
