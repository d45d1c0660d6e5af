"""The verl layer: everything that imports, patches or subclasses verl's internals, version-checked.

``plugin`` is verl's entry point (``verl.plugins`` group) and attaches each hook after its target module loads;
``trainer`` holds the ``tor_sync`` / ``tor_colocate_async`` trainer modes; ``engine`` the top-p entropy hook in
verl's FSDP engine; ``fixes/`` the verl bugs fixed at run time (each only where a probe shows it); ``contract``
fingerprints every verl function relied on, per verl version (``patches/contract/``); ``support`` the estimator x
policy-loss matrix. ``patches/README.md`` mirrors each touch as a diff against the pinned verl.
"""
