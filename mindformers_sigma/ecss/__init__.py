"""Expert Computation and Storage Separation (ECSS): experts stored and updated on the host.

RRE routing is a pure function of (domain, token), so the host knows each step's experts
before the step.  ``host_store`` keeps every expert's weights and AdamW moments in host memory;
``slab`` decides which device slot holds which expert this step; ``host_adamw`` updates the
experts a step touched; ``offload`` drives the three around each training step.
"""
