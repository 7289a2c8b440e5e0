"""Shared test setup. Run the suite with: python -m pytest tests

Triton reads TRITON_INTERPRET at import, at each @triton.jit and at launch, so it must be set before
anything imports triton: here, first thing (set later, the kernels are interpreted but their launches
fail). On a GPU machine run with TRITON_INTERPRET=0 to test the compiled kernels instead.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
