"""The pure core: events, the machine, state, evolve, decide and the rules. No I/O at all.

Everything a reader needs to understand behaviour is here and is testable without processes,
clocks, disks or threads. Modules here import only the standard library, pydantic,
transitions and each other (tests/unit/test_layering.py checks it).
"""
