"""Adapters: one module per effect on the world (journal, processes, HTTP, NVML, the hub).

They may import `engine.core` and `engine.effects`, never the orchestrator, steps, recovery
or the CLI (tests/unit/test_layering.py checks it).
"""
