"""What a user runs: the ``verl-tor`` CLI (``cli``), ``verl-tor demo`` through verl's real trainer (``loop_demo``) and
its one-step walk-through (``demo``), ``verl-tor inspect`` (``inspection``), benchmark evaluation (``evaluate``), ToR
measured on the figure reader (``grounding``), and the in-process stand-ins for verl's Ray worker group and
TransferQueue that the one-step tools run on (``in_process``). The top layer: it may import every other one.
"""
