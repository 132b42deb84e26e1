"""Benchmarks and data generators of the lakehouse; run them from the project root as modules.

``python -m scripts.bench_core --help`` (likewise ``bench_s3``, ``bench_vectors``, ``bench_vector_cache``,
``bench_ann_libraries``, ``loadgen``; ``charts`` redraws docs/charts/ from docs/figures.json). Shared code:
``harness`` (server process, memory and CPU, Flight clients, report, command line) and ``workloads``
(the inputs and the in-process anchors). The generators ``gen_workers.py`` and ``gen_schemas.py`` also
run as plain files.
"""
