"""Planning a run before anyone buys the fleet: `stalwart plan`.

- catalog.py: accelerators (compute, memory, links, MTBF), each number with its source;
- shapes.py: a model's parameter counts and the dimensions that set FLOPs and traffic;
- estimate.py: one run on one fleet: FLOPs, a step's roofline, failures, time and cost;
- compare.py: one run on several fleets, with sensitivity to MTBF and scale-out bandwidth;
- measured.py: step time, checkpoint cost and recovery measured in a stalwart run;
- command.py: the CLI's flags and tables.
"""
