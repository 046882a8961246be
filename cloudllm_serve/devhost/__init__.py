"""Running on one development machine: apart from the product, never imported by a replica.

``make serve``'s launcher (:mod:`.launcher`) and the ``serve run`` wrapper it starts
(:mod:`.serve_run`), which keeps vLLM first on a small CPU host (:mod:`.cpu_priority`,
:mod:`.cpu_affinity`, over :mod:`.procfs`); port checks (:mod:`.ports`); the two-node
demo cluster (:mod:`.cluster_demo`); the tiny test VLM (:mod:`.test_vlm`); and the hook
that makes torchvision's CUDA build importable beside the CPU torch
(:mod:`.torchvision_compat`). Their settings are :class:`.settings.HostSettings`, not the
app's. ``tests/unit/test_layers.py`` keeps the product from importing this package.
"""
