"""`python -m harness.advise`: which configuration to run, for a model, a machine and a memory cap.

It prices every configuration of the free groups with the cost model a run's plan uses (harness/runners/layerbench/
cost.py), drops what cannot fit, ranks the rest, and with `advise.verify=N` measures N of them to check the ranking.
"""
