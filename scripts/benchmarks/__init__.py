"""gridq's benchmark, kept out of the installed packages: ``scripts/bench`` runs ``python -m scripts.benchmarks``.

The run is made of *sections*, one module each in ``scripts/benchmarks/sections/``
(see its ``__init__``): a new measurement is one new module there. Shared parts:
``common`` (configuration, constants), ``cluster`` (gridq processes started as
users start them), ``measure`` (what is timed through the public client), and
``baseline`` (the plain pyzmq load-balancing broker gridq is compared with).
Imports point one way: sections -> cluster/measure -> common/baseline.
"""
