"""Small models, data and training loops used by the CLI, benchmarks and notebooks.

Not imported by ``import samx``; needs the ``examples`` extra
(``pip install "samx[examples]"``).
"""
