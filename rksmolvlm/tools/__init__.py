"""Board tools over a bundle: ``verify`` (golden answers), ``bench`` (timings), ``doctor`` (board checks).

They run on the board like the runtime, and open their runner through ``rksmolvlm.runners``.
"""
