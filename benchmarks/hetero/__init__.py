"""The parts of ``benchmarks/heterogeneous.py``, one module each.

- :mod:`hetero.budget`: the budget's shares, the stop at its end, the record
  saved after every part;
- :mod:`hetero.machine`: the sizes, the devices, the machine, the problem;
- :mod:`hetero.calibration`: AsyncSAM's b', calibrated (part 2);
- :mod:`hetero.steps`: time per step relative to SGD, interleaved (part 3);
- :mod:`hetero.overlap`: a measured timeline of AsyncSAM steps (part 4);
- :mod:`hetero.time_to_accuracy`: test accuracy against wall time (part 5);
- :mod:`hetero.sweep`: the model-size sweep (part 6);
- :mod:`hetero.report`: the Markdown tables; :mod:`hetero.figures`: the plots;
- :mod:`hetero.cli`: the command line and the order of the parts.
"""
