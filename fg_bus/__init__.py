"""fg_bus: the wire between the training process and its sinks (records, publisher, subscriber, registry).

The bus arrives with issue 3; this package deliberately imports neither `trainer` nor `sinks`, nor torch.
"""

__version__ = "0.1.0"
